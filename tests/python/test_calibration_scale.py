"""Calibration at scale (docs/calibration.md, "Large models"): statistics shared by layers that read
the same input, Hessians pooled over spans of step bins, held-out checks on input samples, and
record_pipeline(max_memory=...) recording in passes that replay the captured denoiser calls."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import arrow_quant_v2 as aq  # noqa: E402
from arrow_quant_v2 import ConfigurationError  # noqa: E402
from arrow_quant_v2.calibration import CalibrationRecorder, load_calibration, record_pipeline  # noqa: E402
from conftest import write_model_file  # noqa: E402

T_MAX = 1000


class Block(nn.Module):
    """A DiT-like block: adaLN from the conditioning vector (recomputed per block, as diffusers'
    blocks do), attention whose q/k/v read one tensor, an MLP."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ada = nn.Linear(d, 2 * d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.up = nn.Linear(d, 3 * d)
        self.down = nn.Linear(3 * d, d)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(torch.nn.functional.silu(c)).chunk(2, -1)
        h = nn.functional.layer_norm(x, x.shape[-1:]) * (1 + scale[:, None]) + shift[:, None]
        q, k, v = self.q(h), self.k(h), self.v(h)
        a = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, -1) @ v
        x = x + self.o(a)
        return x + self.down(nn.functional.gelu(self.up(x)))


class TinyDiT(nn.Module):
    def __init__(self, d: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.t_embed = nn.Linear(8, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        freqs = torch.arange(4, dtype=torch.float32)
        t = timestep.float()[:, None] / T_MAX * torch.exp(freqs)[None]
        c = self.t_embed(torch.cat([t.sin(), t.cos()], -1))
        for b in self.blocks:
            x = b(x, c)
        return self.out(x)


class Scheduler:
    config = {"num_train_timesteps": T_MAX}


class Pipe:
    """A diffusers-like pipeline: pipe(seed=..., num_inference_steps=n) calls pipe.transformer once
    per step, feeding each output into the next call."""

    def __init__(self, model: nn.Module) -> None:
        self.transformer = model
        self.scheduler = Scheduler()

    def __call__(self, seed: int, num_inference_steps: int):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 6, self.transformer.out.in_features, generator=g)
        for t in np.linspace(T_MAX - 1, 0, num_inference_steps):
            eps = self.transformer(x, timestep=torch.full((2,), float(t)))
            x = x - 0.05 * eps
        return x


def _model(seed: int = 0, d: int = 16) -> TinyDiT:
    torch.manual_seed(seed)
    return TinyDiT(d).eval()


def _rows_by_key(path):
    return {(r["layer"], r["bin"], r["split"]): r for r in pq.read_table(path).to_pylist()}


def test_layers_reading_one_input_share_statistics(tmp_path):
    model = _model()
    with CalibrationRecorder(model, num_bins=2, holdout_every=0) as rec, torch.no_grad():
        for t in (100.0, 900.0):
            with rec.step(t):
                model(torch.randn(2, 6, 16), torch.full((2,), t))
        path = rec.save(tmp_path / "c.parquet")
    shared = rec.shared_inputs
    for i in range(3):
        assert shared[f"blocks.{i}.k.weight"] == f"blocks.{i}.q.weight"
        assert shared[f"blocks.{i}.v.weight"] == f"blocks.{i}.q.weight"
        # the adaLN inputs are recomputed per block but equal: shared by value
        if i:
            assert shared[f"blocks.{i}.ada.weight"] == "blocks.0.ada.weight"
    assert "blocks.0.o.weight" not in shared and "blocks.1.q.weight" not in shared
    # one Hessian is held per owner: 3 blocks x (ada once, q, o, up, down) + t_embed + out - 2 ada
    assert len({k[0] for k in rec._hessians}) == 3 * 4 + 1 + 2 + 1 - 1
    rows = _rows_by_key(path)
    k_row, q_row = rows[("blocks.1.k.weight", 0, "fit")], rows[("blocks.1.q.weight", 0, "fit")]
    assert k_row["hessian"] is None and k_row["hessian_from"] == "blocks.1.q.weight"
    assert k_row["hessian_reason"] is None and k_row["hessian_rows"] == q_row["hessian_rows"] == 12
    assert k_row["absmax"] == q_row["absmax"] and k_row["inputs"] == q_row["inputs"]
    data = load_calibration(path)
    assert data[("blocks.1.k.weight", 0, "fit")]["hessian"] is data[("blocks.1.q.weight", 0, "fit")]["hessian"]


def test_share_inputs_false_keeps_every_layer_apart():
    model = _model()
    with CalibrationRecorder(model, num_bins=1, holdout_every=0, share_inputs=False) as rec, torch.no_grad():
        with rec.step(10):
            model(torch.randn(2, 6, 16), torch.full((2,), 10.0))
    assert rec.shared_inputs == {}
    assert torch.equal(rec.hessian("blocks.0.k.weight", 0), rec.hessian("blocks.0.q.weight", 0))


def test_sharing_broken_in_a_later_call_is_an_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x, split):
            return self.a(x) + self.b(x + 1 if split else x)

    m = Branchy()
    with CalibrationRecorder(m, holdout_every=0) as rec, torch.no_grad():
        with rec.step(1):
            m(torch.randn(200, 4), False)
        with pytest.raises(ConfigurationError, match=r"'b.weight' read the same input as 'a.weight'.*share_inputs=False"):
            with rec.step(2):
                m(torch.randn(200, 4), True)


def test_hessians_pooled_over_spans_and_holdout_without_hessians(tmp_path):
    model = _model()
    xs = [torch.randn(2, 6, 16) for _ in range(8)]
    steps = [50.0, 300.0, 550.0, 800.0] * 2
    kw = dict(num_bins=4, holdout_every=4, share_inputs=False)
    with CalibrationRecorder(model, **kw) as per_bin, torch.no_grad():
        for x, t in zip(xs, steps):
            with per_bin.step(t):
                model(x, torch.full((2,), t))
    with CalibrationRecorder(model, hessian_bins=2, holdout_hessians=False, **kw) as pooled, torch.no_grad():
        for x, t in zip(xs, steps):
            with pooled.step(t):
                model(x, torch.full((2,), t))
        path = pooled.save(tmp_path / "c.parquet")
    name = "blocks.1.up.weight"
    want = per_bin.hessian(name, 0) + per_bin.hessian(name, 1)
    torch.testing.assert_close(pooled.hessian(name, 1), want, rtol=1e-12, atol=1e-12)
    rows = _rows_by_key(path)
    b0, b1 = rows[(name, 0, "fit")], rows[(name, 1, "fit")]
    assert b0["hessian_span"] == b1["hessian_span"] == 2
    assert b0["hessian"] is not None and b0["hessian_rows"] == b0["rows"] + b1["rows"]
    assert b1["hessian"] is None and b1["hessian_reason"] is None and b1["hessian_rows"] is None
    hold = rows[(name, 3, "holdout")]
    assert hold["hessian"] is None and "holdout_hessians=False" in hold["hessian_reason"]
    assert hold["inputs"] is not None
    assert pooled.max_hessian_bytes() * 4 == per_bin.max_hessian_bytes()  # half the spans, no held-out ones
    data = load_calibration(path)
    np.testing.assert_allclose(data[(name, 0, "fit")]["hessian"], want.numpy(), rtol=1e-6,
                               atol=1e-6 * float(want.abs().max()))


def test_hessian_bins_must_divide_num_bins():
    with pytest.raises(ConfigurationError, match="hessian_bins"):
        CalibrationRecorder(nn.Linear(2, 2), num_bins=10, hessian_bins=3)


def _record(tmp_path, name, **kw):
    pipe = Pipe(_model())
    path = tmp_path / name
    rec = record_pipeline(pipe, [{"seed": 1}, {"seed": 2}], num_inference_steps=6, num_bins=3, max_samples=12,
                          output_path=path, **kw)
    return rec, path


def test_record_pipeline_in_passes_writes_what_one_pass_writes(tmp_path):
    """max_memory small enough for a few layers per pass: the passes replay the captured calls and
    the file holds the same rows, with the same values, as one pass (layers in the order they ran)."""
    _, one = _record(tmp_path, "one.parquet", hessian_bins=1)
    events = []
    rec, multi = _record(tmp_path, "multi.parquet", hessian_bins=1, max_memory=3 * 16 * 16 * 8,
                         progress_callback=lambda m, f: events.append((m, f)), progress=False)
    a, b = _rows_by_key(one), _rows_by_key(multi)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key
    assert any("pass 5/" in m for m, _ in events) and events[-1][1] == 1.0
    assert all(f0 <= f1 for (_, f0), (_, f1) in zip(events, events[1:]))
    with pytest.raises(ConfigurationError, match="pass by pass"):
        rec.save(tmp_path / "again.parquet")
    assert pq.read_metadata(multi).metadata[b"arrowquant.samples"] == b"12"


def test_record_pipeline_max_memory_needs_an_output_path():
    with pytest.raises(ConfigurationError, match="output_path"):
        record_pipeline(Pipe(_model()), {"seed": 1}, num_inference_steps=2, max_memory=1 << 20)


def _v1_copy(src, dst):
    """The file as version 1 wrote it: full float64 Hessians, no span / shared columns."""
    data = load_calibration(src)
    t = pq.read_table(src)
    hess = []
    for r in t.to_pylist():
        h = data[(r["layer"], r["bin"], r["split"])]["hessian"]
        hess.append(None if r["hessian_reason"] is not None else h.reshape(-1).tolist())
    cols = {n: t.column(n) for n in t.column_names if n not in ("hessian_span", "hessian_rows", "hessian_from")}
    cols["hessian"] = pa.array(hess, type=pa.list_(pa.float64()))
    meta = dict(t.schema.metadata)
    meta[b"arrowquant.calibration_version"] = b"1"
    pq.write_table(pa.table(cols).replace_schema_metadata(meta), dst, row_group_size=1)


def test_engine_reads_pooled_files_and_version_1(tmp_path):
    """The engine quantizes with pooled Hessians and no held-out Hessians (GPTQ on the pooled
    Hessian, every group checked on its held-out input samples), and still reads version 1."""
    model = _model(d=32)
    src = tmp_path / "model"
    src.mkdir()
    write_model_file(src / "model.safetensors", {k: v.detach().numpy() for k, v in model.state_dict().items()})
    (src / "config.json").write_text(json.dumps({"architectures": ["DiT"]}))
    rec = record_pipeline(Pipe(model), [{"seed": 1}, {"seed": 2}], num_inference_steps=8, num_bins=4,
                          hessian_bins=1, holdout_hessians=False, share_inputs=False,
                          output_path=src / "calibration.parquet")
    cfg = dict(bit_width=4, group_size=32, min_tensor_size=0, enable_fallback=False, sensitive_patterns=[],
               num_time_groups=2)
    r = aq.ArrowQuantV2().quantize_diffusion_model(str(src), str(tmp_path / "q"), aq.DiffusionQuantConfig(**cfg))
    assert r["calibration"]["layers_gptq"] == len(rec.layers)
    for layer in r["layers"]:
        if layer["quantized"]:
            assert len(layer["output_error"]) == 2
            for g in layer["output_error"]:
                assert g["checked_on"].endswith("input samples") and g["held_out"]
    # version 1: the same statistics with one full Hessian per bin; with per-bin Hessians recorded
    record_pipeline(Pipe(model), [{"seed": 1}, {"seed": 2}], num_inference_steps=8, num_bins=4,
                    share_inputs=False, output_path=tmp_path / "v2.parquet")
    _v1_copy(tmp_path / "v2.parquet", src / "calibration.parquet")
    assert load_calibration(src / "calibration.parquet").metadata["arrowquant.calibration_version"] == "1"
    r1 = aq.ArrowQuantV2().quantize_diffusion_model(str(src), str(tmp_path / "q1"), aq.DiffusionQuantConfig(**cfg))
    (src / "calibration.parquet").unlink()
    import shutil
    shutil.copy(tmp_path / "v2.parquet", src / "calibration.parquet")
    r2 = aq.ArrowQuantV2().quantize_diffusion_model(str(src), str(tmp_path / "q2"), aq.DiffusionQuantConfig(**cfg))
    e1 = {l["tensor"]: [g["relative_error"] for g in l["output_error"]] for l in r1["layers"] if l["quantized"]}
    e2 = {l["tensor"]: [g["relative_error"] for g in l["output_error"]] for l in r2["layers"] if l["quantized"]}
    assert e1.keys() == e2.keys() and len(e1) == len(rec.layers)
    for k in e1:  # float64 vs float32-stored Hessians
        np.testing.assert_allclose(e1[k], e2[k], rtol=1e-3, err_msg=k)
        assert all(g["checked_on"] == "Hessian" for l in r2["layers"] if l["tensor"] == k for g in l["output_error"])


def test_fit_input_samples_apart_from_held_out_ones():
    model = _model()
    with CalibrationRecorder(model, num_bins=1, holdout_every=2, input_samples=5, fit_input_samples=0) as rec, \
            torch.no_grad():
        for t in (10.0, 20.0):
            with rec.step(t):
                model(torch.randn(2, 6, 16), torch.full((2,), t))
    assert rec._stats[("out.weight", 0, "fit")].inputs is None
    assert rec._stats[("out.weight", 0, "holdout")].inputs.shape == (5, 16)
    with pytest.raises(ConfigurationError, match="fit_input_samples"):
        CalibrationRecorder(model, fit_input_samples=-1)


class SavablePipe(Pipe):
    """Pipe whose denoiser has save_pretrained, as diffusers models do (one safetensors file)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)

        def save_pretrained(path):
            write_model_file(os.path.join(path, "model.safetensors"),
                             {k: v.detach().numpy() for k, v in model.state_dict().items()})
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump({"architectures": ["DiT"]}, f)

        model.save_pretrained = save_pretrained


def test_calibrate_and_quantize_in_one_call(tmp_path):
    from arrow_quant_v2.calibration import calibrate_and_quantize

    model = _model(d=32)
    cfg = aq.DiffusionQuantConfig(bit_width=4, group_size=32, min_tensor_size=0, enable_fallback=False,
                                  sensitive_patterns=[], num_time_groups=2)
    events = []
    r = calibrate_and_quantize(SavablePipe(model), [{"seed": 1}, {"seed": 2}], tmp_path / "q", cfg,
                               num_inference_steps=6, num_bins=4, max_memory=2 * 32 * 32 * 8, progress=False,
                               progress_callback=lambda m, f: events.append((m, f)))
    assert cfg.calibration_path is None  # the caller's config is not changed
    assert r["calibration"]["layers_gptq"] == r["calibration_recording"]["layers"] == 23
    assert len(r["calibration_recording"]["passes"]) > 2
    assert (tmp_path / "q.calibration.parquet").exists()
    assert sorted(os.listdir(tmp_path)) == ["q", "q.calibration.parquet"]  # the saved denoiser is removed
    assert events[0][0].startswith("calibration: ") and any(m.startswith("quantization: ") for m, _ in events)
    assert all(f0 <= f1 for (_, f0), (_, f1) in zip(events, events[1:]))
    loaded = aq.load(r["quantized_path"])
    w = model.blocks[0].q.weight.detach().numpy()
    q = loaded["blocks.0.q.weight"].numpy()
    assert np.linalg.norm(q - w) / np.linalg.norm(w) < 0.2


class SharedModule(nn.Module):
    """A layer run twice per forward (start and end): replays must not stop before its second run."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        # defined after mid: the first pass (model order) records mid.0, a replay records shared
        self.mid = nn.ModuleList(nn.Linear(d, d) for _ in range(3))
        self.shared = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x = self.shared(x) * (1 + timestep.float()[:, None, None] / T_MAX)
        for m in self.mid:
            x = torch.tanh(m(x))
        return self.out(self.shared(x))


def test_record_pipeline_in_passes_with_a_layer_run_twice(tmp_path):
    torch.manual_seed(0)
    pipe = Pipe(TinyDiT())
    pipe.transformer = SharedModule().eval()
    paths = []
    for name, kw in (("one", {}), ("multi", {"max_memory": 16 * 16 * 8})):
        paths.append(tmp_path / f"{name}.parquet")
        record_pipeline(pipe, [{"seed": 1}], num_inference_steps=4, num_bins=2, hessian_bins=1, output_path=paths[-1],
                        progress=False, **kw)
    a, b = _rows_by_key(paths[0]), _rows_by_key(paths[1])
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert a[("shared.weight", 0, "fit")]["rows"] == 2 * a[("out.weight", 0, "fit")]["rows"]


class Wide(nn.Module):
    """An MLP whose down-projection is wider than max_hessian_features (640 inputs, blocks of 256)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(32, 640)
        self.down = nn.Linear(640, 32)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x)) * (1 + timestep.float()[:, None, None] / T_MAX))


def _correlated(seed: int, rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, rows, 4, generator=g)
    mix = torch.randn(4, 32, generator=torch.Generator().manual_seed(99))
    return z @ mix + 0.2 * torch.randn(2, rows, 32, generator=g)


def test_wide_layers_keep_block_diagonal_hessians(tmp_path):
    """A layer wider than max_hessian_features keeps the diagonal blocks of its Hessian: each equal to
    the same block of X^T X, written as the blocks' upper triangles and read back as blocks."""
    torch.manual_seed(0)
    model = Wide().eval()
    seen = []
    hook = model.down.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, 640).double()))
    with CalibrationRecorder(model, num_bins=2, holdout_every=0, max_hessian_features=512,
                             hessian_block=256) as rec, torch.no_grad():
        rec.attach_timestep()
        for i, t in enumerate((900.0, 800.0, 100.0)):
            model(_correlated(i, 12), torch.full((2,), t))
    hook.remove()
    assert rec.hessian_blocks == {"down.weight": 256}
    assert rec.hessian_reasons == {}
    assert rec.layer_hessian_bytes("down.weight") == (2 * 256 * 256 + 128 * 128) * 8 * 2
    x = torch.cat(seen[:2])  # bin 1: t 900 and 800
    full = x.t() @ x
    blocks = rec.hessian("down.weight", 1)
    assert [tuple(b.shape) for b in blocks] == [(256, 256), (256, 256), (128, 128)]
    for (lo, hi), b in zip(((0, 256), (256, 512), (512, 640)), blocks):
        torch.testing.assert_close(b, full[lo:hi, lo:hi], rtol=1e-5, atol=1e-5 * float(full.abs().max()))
    assert isinstance(rec.hessian("up.weight", 1), torch.Tensor)  # 32 inputs: a full matrix
    path = rec.save(tmp_path / "c.parquet")
    raw = _rows_by_key(path)[("down.weight", 1, "fit")]
    assert raw["hessian_block"] == 256 and len(raw["hessian"]) == 2 * 256 * 257 // 2 + 128 * 129 // 2
    assert _rows_by_key(path)[("up.weight", 1, "fit")]["hessian_block"] is None
    data = load_calibration(path)
    row = data[("down.weight", 1, "fit")]
    assert row["hessian_block"] == 256 and [h.shape for h in row["hessian"]] == [(256, 256), (256, 256), (128, 128)]
    for a, b in zip(row["hessian"], blocks):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-6, atol=1e-6 * float(b.abs().max()))
    with pytest.raises(ConfigurationError, match="hessian_block"):
        CalibrationRecorder(model, hessian_block=100)
    # hessian_block=0 (or above max_hessian_features): no Hessian for the wide layer, as before
    none = CalibrationRecorder(model, max_hessian_features=512, hessian_block=0)
    assert none.hessian_reasons == {"down.weight": "in_features 640 > max_hessian_features 512"}
    none.close()


def test_engine_runs_gptq_on_block_diagonal_hessians(tmp_path):
    """The engine quantizes the wide layer with GPTQ on its block-diagonal Hessian (reported as such),
    and its output error on held-out inputs is below the data-free codes' error."""
    torch.manual_seed(1)
    model = Wide().eval()
    src = tmp_path / "model"
    src.mkdir()
    write_model_file(src / "model.safetensors", {k: v.detach().numpy() for k, v in model.state_dict().items()})
    (src / "config.json").write_text(json.dumps({"architectures": ["Wide"]}))
    with CalibrationRecorder(model, num_bins=2, holdout_every=2, max_hessian_features=512,
                             hessian_block=256) as rec, torch.no_grad():
        rec.attach_timestep()
        for i, t in enumerate(np.linspace(999, 0, 16)):
            model(_correlated(i, 32), torch.full((2,), float(t)))
    rec.save(src / "calibration.parquet")
    base = dict(bit_width=3, group_size=32, min_tensor_size=0, enable_fallback=False, sensitive_patterns=[],
                num_time_groups=2)
    r = aq.ArrowQuantV2().quantize_diffusion_model(str(src), str(tmp_path / "q"), aq.DiffusionQuantConfig(**base))
    down = next(l for l in r["layers"] if l["tensor"] == "down.weight")
    assert down["method"] == "gptq" and down["hessian_block"] == 256
    assert all(g["held_out"] and g["checked_on"] == "Hessian" for g in down["output_error"])
    # the same layer without calibration, measured on held-out inputs directly
    (src / "calibration.parquet").rename(tmp_path / "calibration.parquet")
    aq.ArrowQuantV2().quantize_diffusion_model(str(src), str(tmp_path / "plain"), aq.DiffusionQuantConfig(**base))
    w = model.down.weight.detach()
    x = torch.nn.functional.gelu(model.up(_correlated(100, 64))).reshape(-1, 640).detach()

    def err(out):
        q = torch.from_numpy(aq.load(str(tmp_path / out))["down.weight"].numpy())
        return float(((x @ (w - q).t()).norm() / (x @ w.t()).norm()))

    assert err("q") < 0.9 * err("plain"), (err("q"), err("plain"))


MASK_ID = 0


class TinyLM(nn.Module):
    """A diffusion-LM-like denoiser: token ids in, logits out, no timestep argument."""

    def __init__(self, vocab: int = 32, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(2))
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        c = x.mean(1)
        for b in self.blocks:
            x = b(x, c)
        return self.head(x)


class MaskedDiffusion:
    """pipe(seed=..., num_inference_steps=n): starts fully masked and unmasks 1/n of the tokens per
    step, as Dream's and LLaDA's samplers do."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, seed: int, num_inference_steps: int):
        g = torch.Generator().manual_seed(seed)
        ids = torch.full((2, 12), MASK_ID)
        order = torch.randperm(12, generator=g)
        for s in range(num_inference_steps):
            logits = self.model(input_ids=ids)
            k = order[s * 12 // num_inference_steps:(s + 1) * 12 // num_inference_steps]
            ids[:, k] = logits[:, k].argmax(-1).clamp(min=1)
        return ids


def test_record_pipeline_of_a_diffusion_lm_by_mask_ratio(tmp_path):
    """step_kind='mask_ratio' with a function of the denoiser's arguments: each call falls in the bin
    of its mask ratio, and the recording in passes equals the one-pass recording."""
    torch.manual_seed(0)
    model = TinyLM().eval()

    def ratio(args, kwargs):
        return (kwargs["input_ids"] == MASK_ID).float().mean()

    kw = dict(num_inference_steps=4, num_bins=4, step_kind="mask_ratio", step_arg=ratio, share_inputs=False)
    one = record_pipeline(MaskedDiffusion(model), [{"seed": 1}], output_path=tmp_path / "one.parquet", **kw)
    assert one.step_kind == "mask_ratio" and one.step_range == (0.0, 1.0)
    data = load_calibration(tmp_path / "one.parquet")
    assert data.metadata["arrowquant.step_kind"] == "mask_ratio"
    # mask ratios 1, 0.75, 0.5, 0.25: one call in each bin but the lowest (0.25 lands in bin 1)
    bins = sorted({b for (layer, b, split) in data if layer == "head.weight"})
    assert bins == [1, 2, 3]
    passes = record_pipeline(MaskedDiffusion(model), [{"seed": 1}], output_path=tmp_path / "passes.parquet",
                             max_memory=4 * 16 * 16 * 8, **kw)
    assert len(passes.passes) > 1
    a, b = _rows_by_key(tmp_path / "one.parquet"), _rows_by_key(tmp_path / "passes.parquet")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k]["rows"] == b[k]["rows"] and a[k]["hessian"] == b[k]["hessian"], k


def test_ggml_scheme_runs_gptq_on_block_diagonal_hessians(tmp_path):
    """GPTQ on ggml's grid (q4_k, blocks of 256 columns) uses a wide layer's block-diagonal Hessian:
    its 256-column blocks hold whole ggml blocks."""
    torch.manual_seed(2)

    class WideQ(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.Linear(256, 768)
            self.down = nn.Linear(768, 256)

        def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return self.down(torch.nn.functional.gelu(self.up(x)))

    model = WideQ().eval()
    src = tmp_path / "model"
    src.mkdir()
    write_model_file(src / "model.safetensors", {k: v.detach().numpy() for k, v in model.state_dict().items()})
    (src / "config.json").write_text(json.dumps({"architectures": ["WideQ"]}))
    mix = torch.randn(8, 256, generator=torch.Generator().manual_seed(3))
    with CalibrationRecorder(model, num_bins=2, holdout_every=2, max_hessian_features=512,
                             hessian_block=256) as rec, torch.no_grad():
        rec.attach_timestep()
        for i, t in enumerate(np.linspace(999, 0, 8)):
            z = torch.randn(2, 32, 8, generator=torch.Generator().manual_seed(i))
            model(z @ mix, torch.full((2,), float(t)))
    rec.save(src / "calibration.parquet")
    cfg = aq.DiffusionQuantConfig(scheme="q4_k", min_tensor_size=0, enable_fallback=False, sensitive_patterns=[],
                                  num_time_groups=2)
    r = aq.ArrowQuantV2().quantize_diffusion_model(str(src), str(tmp_path / "q"), cfg)
    down = next(l for l in r["layers"] if l["tensor"] == "down.weight")
    assert down["method"] == "gptq" and down["hessian_block"] == 256 and down["scheme"] == "q4_k"
    assert next(l for l in r["layers"] if l["tensor"] == "up.weight").get("hessian_block") is None


def test_block_diagonal_hessian_of_the_wrong_length_is_reported(tmp_path):
    """A file whose hessian_block does not match its Hessian's length: the engine says which file,
    row and layout, and quantizes the layer without it."""
    torch.manual_seed(3)
    model = Wide().eval()
    src = tmp_path / "model"
    src.mkdir()
    write_model_file(src / "model.safetensors", {k: v.detach().numpy() for k, v in model.state_dict().items()})
    (src / "config.json").write_text(json.dumps({"architectures": ["Wide"]}))
    with CalibrationRecorder(model, num_bins=1, holdout_every=0, max_hessian_features=512,
                             hessian_block=256) as rec, torch.no_grad():
        rec.attach_timestep()
        model(_correlated(0, 16), torch.full((2,), 500.0))
    rec.save(tmp_path / "good.parquet")
    t = pq.read_table(tmp_path / "good.parquet")
    blocks = [512 if (layer == "down.weight") else b for layer, b in
              zip(t.column("layer").to_pylist(), t.column("hessian_block").to_pylist())]
    t = t.set_column(t.schema.get_field_index("hessian_block"), "hessian_block", pa.array(blocks, pa.int32()))
    pq.write_table(t, src / "calibration.parquet", row_group_size=1)
    cfg = aq.DiffusionQuantConfig(bit_width=4, group_size=32, min_tensor_size=0, enable_fallback=False,
                                  sensitive_patterns=[])
    r = aq.ArrowQuantV2().quantize_diffusion_model(str(src), str(tmp_path / "q"), cfg)
    down = next(l for l in r["layers"] if l["tensor"] == "down.weight")
    assert down["method"] == "data-free"
    msg = next(w for w in r["warnings"] if w.startswith("down.weight"))
    assert "calibration.parquet" in msg and "2 diagonal blocks of 512" in msg, msg


def test_calibrate_and_quantize_a_diffusion_lm(tmp_path):
    """The README's diffusion-LM call: calibrate_and_quantize with a sampler whose `model` is the
    denoiser, by mask ratio, quantizing the checkpoint in source_dir."""
    from arrow_quant_v2.calibration import calibrate_and_quantize

    torch.manual_seed(4)
    model = TinyLM().eval()
    src = tmp_path / "lm"
    src.mkdir()
    write_model_file(src / "model.safetensors", {k: v.detach().numpy() for k, v in model.state_dict().items()})
    (src / "config.json").write_text(json.dumps({"architectures": ["TinyLM"]}))
    cfg = aq.DiffusionQuantConfig(bit_width=4, group_size=32, min_tensor_size=0, enable_fallback=False,
                                  sensitive_patterns=[])
    r = calibrate_and_quantize(MaskedDiffusion(model), [{"seed": 1}, {"seed": 2}], tmp_path / "lm-int4", cfg,
                               num_inference_steps=4, source_dir=src, max_memory=4 * 16 * 16 * 8, progress=False,
                               step_kind="mask_ratio",
                               step_arg=lambda a, kw: (kw["input_ids"] == MASK_ID).float().mean())
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert r["calibration"]["layers_gptq"] == len(linear)
    assert load_calibration(r["calibration_recording"]["path"]).metadata["arrowquant.step_kind"] == "mask_ratio"
