"""calibrate_and_quantize(sequential=True): each block is recorded with the earlier blocks holding
their quantized weights, and quantized exactly as the final output stores it (docs/calibration.md,
"Sequential mode")."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
from torch import nn  # noqa: E402

import arrow_quant_v2 as aq  # noqa: E402
from arrow_quant_v2 import ConfigurationError  # noqa: E402
from arrow_quant_v2.calibration import calibrate_and_quantize, load_calibration  # noqa: E402
from test_calibration_scale import SavablePipe, SharedModule, TinyDiT  # noqa: E402


class PosDiT(TinyDiT):
    """TinyDiT with a learned positional table: a tensor the recorder does not see (quantized
    data-free before the first block)."""

    def __init__(self, d: int) -> None:
        super().__init__(d)
        self.pos = nn.Parameter(torch.randn(6, d) * 0.5)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return super().forward(x + self.pos, timestep)


def _config(**kw):
    return aq.DiffusionQuantConfig(bit_width=3, group_size=32, min_tensor_size=0, enable_fallback=False,
                                   sensitive_patterns=[], num_time_groups=2, **kw)


RUNS = [{"seed": 1}, {"seed": 2}]


def _fit_hessian(path, layer):
    data = load_calibration(path)
    found = [e["hessian"] for (name, _, split), e in data.items()
             if name == layer and split == "fit" and e["hessian"] is not None]
    assert len(found) == 1  # one Hessian over the trajectory (hessian_bins=1)
    return found[0]


def test_sequential_blocks_see_the_quantized_earlier_blocks(tmp_path):
    torch.manual_seed(0)
    model = PosDiT(32).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    pipe = SavablePipe(model)
    inputs = []  # the denoiser's arguments along the float trajectory, as the first pass captures them
    hook = model.register_forward_pre_hook(lambda m, a, kw: inputs.append((a, kw)), with_kwargs=True)
    with torch.no_grad():
        for run in RUNS:
            pipe(num_inference_steps=6, **run)
    hook.remove()

    events = []
    r = calibrate_and_quantize(pipe, RUNS, tmp_path / "q", _config(), num_inference_steps=6, num_bins=4,
                               holdout_every=0, sequential=True, keep_dequantized=True, progress=False,
                               progress_callback=lambda m, f: events.append((m, f)))
    seq = r["calibration_recording"]["sequential"]
    assert [b["block"] for b in seq["blocks"]] == [None, "blocks.0", "blocks.1", "blocks.2", None]
    assert seq["data_free_first"] == 1  # pos
    assert r["calibration"]["layers_gptq"] == r["calibration_recording"]["layers"] == 23
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["config"]["time_groups"] == seq["time_groups"] and len(seq["time_groups"]) == 2
    assert [g["bins"] for g in manifest["calibration"]["data"]["time_groups"]] == seq["time_groups"]
    assert all(f0 <= f1 for (_, f0), (_, f1) in zip(events, events[1:]))
    assert any(m.startswith("calibration: sequential: block 5/5") for m, _ in events)
    assert any(m.startswith("quantization: ") for m, _ in events)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "q.calibration.parquet"]

    # keep_dequantized: the denoiser holds exactly what the output stores, every tensor
    loaded = aq.load(r["quantized_path"])
    state = model.state_dict()
    assert sorted(loaded.tensor_names()) == sorted(state)
    for name in loaded.tensor_names():
        assert np.array_equal(loaded[name].numpy(), state[name].numpy()), name
    assert not np.array_equal(state["blocks.1.q.weight"].numpy(), original["blocks.1.q.weight"].numpy())

    # blocks.1.q was recorded on the inputs of a model whose embedder, table and block 0 were
    # quantized, blocks 1 and 2 and the output not yet
    def hessian_of(weights):
        m = PosDiT(32).eval()
        m.load_state_dict(weights)
        h = torch.zeros(32, 32, dtype=torch.float64)

        def add(mod, args):
            x = args[0].reshape(-1, 32).double()
            h.add_(x.t() @ x)

        handle = m.blocks[1].q.register_forward_pre_hook(add)
        with torch.no_grad():
            for a, kw in inputs:
                m(*a, **kw)
        handle.remove()
        return h.numpy()

    partial = dict(original)
    for name in original:
        if name.startswith(("t_embed.", "pos", "blocks.0.")):
            partial[name] = torch.from_numpy(loaded[name].numpy())
    recorded = _fit_hessian(r["calibration_recording"]["path"], "blocks.1.q.weight")
    expected, floating = hessian_of(partial), hessian_of(original)
    err = np.linalg.norm(recorded - expected) / np.linalg.norm(expected)
    assert err < 1e-5, err
    assert np.linalg.norm(floating - expected) / np.linalg.norm(expected) > 100 * max(err, 1e-7)


def test_sequential_restores_the_weights_and_is_deterministic(tmp_path):
    torch.manual_seed(1)
    model = PosDiT(32).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(num_inference_steps=4, num_bins=4, sequential=True, progress=False)
    a = calibrate_and_quantize(SavablePipe(model), RUNS, tmp_path / "a", _config(), **kw)
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k
    b = calibrate_and_quantize(SavablePipe(model), RUNS, tmp_path / "b", _config(), max_memory=32 * 32 * 8, **kw)
    assert max(x["passes"] for x in b["calibration_recording"]["sequential"]["blocks"]) > 1
    qa, qb = aq.load(a["quantized_path"]), aq.load(b["quantized_path"])
    for name in qa.tensor_names():  # passes split by max_memory give the same statistics
        assert np.array_equal(qa[name].numpy(), qb[name].numpy()), name
    # sequential and parallel calibration differ where the inputs moved
    c = calibrate_and_quantize(SavablePipe(model), RUNS, tmp_path / "c", _config(),
                               **{k: v for k, v in kw.items() if k != "sequential"})
    qc = aq.load(c["quantized_path"])
    assert np.array_equal(qa["t_embed.weight"].numpy(), qc["t_embed.weight"].numpy())
    assert not np.array_equal(qa["blocks.2.down.weight"].numpy(), qc["blocks.2.down.weight"].numpy())


def test_sequential_records_every_run_of_a_layer_called_twice(tmp_path):
    """SharedModule's `shared` runs first and last in each call: its block's replays run the whole
    forward, so its statistics hold both runs."""
    torch.manual_seed(2)
    model = SharedModule(32).eval()
    r = calibrate_and_quantize(SavablePipe(model), RUNS, tmp_path / "q", _config(), num_inference_steps=4,
                               num_bins=2, holdout_every=0, sequential=True, progress=False)
    assert [b["block"] for b in r["calibration_recording"]["sequential"]["blocks"]] == [None, "mid.0", "mid.1",
                                                                                       "mid.2", None]
    data = load_calibration(r["calibration_recording"]["path"])
    rows = {name: sum(e["rows"] for (n, _, _), e in data.items() if n == name) for name, _, _ in data}
    assert rows["shared.weight"] == 2 * rows["mid.0.weight"] == 2 * rows["out.weight"]


def test_sequential_arguments_are_checked(tmp_path):
    model = PosDiT(32).eval()
    with pytest.raises(ConfigurationError, match="keep_dequantized applies to sequential=True"):
        calibrate_and_quantize(SavablePipe(model), RUNS, tmp_path / "q", _config(), num_inference_steps=2,
                               keep_dequantized=True, progress=False)
    budget = aq.DiffusionQuantConfig(scheme="q4_k", target_bits_per_weight=4.0)
    with pytest.raises(ConfigurationError, match="model-wide budget"):
        calibrate_and_quantize(SavablePipe(model), RUNS, tmp_path / "q", budget, num_inference_steps=2,
                               sequential=True, progress=False)
    with pytest.raises(ConfigurationError, match="sequential must be True or False"):
        calibrate_and_quantize(SavablePipe(model), RUNS, tmp_path / "q", _config(), num_inference_steps=2,
                               sequential="yes", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_time_groups_in_the_config(tmp_path):
    cfg = aq.DiffusionQuantConfig(time_groups=[[0, 1], (2, 3)])
    assert cfg.time_groups == ((0, 1), (2, 3))
    assert cfg.to_dict()["time_groups"] == [[0, 1], [2, 3]]
    assert aq.DiffusionQuantConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ([], [[]], [[1, 0]], [[0, 1], [1, 2]], [[0.5]], "0,1", [[-1]]):
        with pytest.raises(ConfigurationError, match="time_groups"):
            aq.DiffusionQuantConfig(time_groups=bad)
    # the engine takes them over its own grouping, and names a bin left out
    torch.manual_seed(3)
    model = PosDiT(32).eval()
    pipe = SavablePipe(model)
    r = calibrate_and_quantize(pipe, RUNS, tmp_path / "q", _config(time_groups=[[0], [1, 2, 3]]),
                               num_inference_steps=4, num_bins=4, progress=False)
    assert [g["bins"] for g in r["calibration"]["time_groups"]] == [[0], [1, 2, 3]]
    assert r["calibration"]["grouping_rule"] == "given in the config (time_groups)"
    src = tmp_path / "src"
    src.mkdir()
    pipe.transformer.save_pretrained(str(src))
    with pytest.raises(ConfigurationError, match=r"time_groups leaves out step bin 3, which the calibration .*q\.calibration\.parquet"):
        aq.ArrowQuantV2().quantize_diffusion_model(
            str(src), str(tmp_path / "q2"),
            _config(time_groups=[[0], [1, 2]], calibration_path=str(tmp_path / "q.calibration.parquet")))
    assert not (tmp_path / "q2").exists()
