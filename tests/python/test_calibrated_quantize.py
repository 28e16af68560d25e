"""quantize_diffusion_model with calibration data: GPTQ over timestep groups, output-space errors
per group on held-out inputs, the report, the manifest and `arrowquant inspect`.

A small time-conditioned torch model is built and run here (no downloads); its layer inputs change
with the timestep and have correlated, unevenly scaled features, as a denoiser's do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import arrow_quant_v2 as aq  # noqa: E402
from arrow_quant_v2.calibration import CalibrationRecorder  # noqa: E402
from arrow_quant_v2.errors import ArrowQuantError  # noqa: E402
from arrow_quant_v2.safetensors_writer import write_safetensors  # noqa: E402

T_MAX = 1000


class TinyDenoiser(torch.nn.Module):
    def __init__(self, d: int = 96, hidden: int = 192) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(d, hidden)
        self.mid = torch.nn.Linear(hidden, hidden)
        self.out = torch.nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor, t: float) -> torch.Tensor:
        s = 0.5 + 2.0 * t / T_MAX  # activation ranges move with the timestep
        h = torch.nn.functional.gelu(self.inp(x * s))
        h = torch.nn.functional.gelu(self.mid(h))
        return self.out(h)


def _inputs(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(8, d, generator=g)
    scale = torch.exp(torch.randn(d, generator=g))
    z = torch.randn(n, 8, generator=g)
    return (z @ mix + 0.2 * torch.randn(n, d, generator=g)) * scale


def _save_model(model: torch.nn.Module, root) -> dict:
    """Writes the model's state as root/model.safetensors (root is created); returns the state."""
    root.mkdir()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    write_safetensors(root / "model.safetensors",
                      [(k, "F32", tuple(v.shape)) for k, v in state.items()], lambda k: state[k])
    return state


def _record_two_passes(model, root, x, steps, shift: float, **recorder_kwargs) -> None:
    """Records the model's calibration over two passes of `steps` (the second on x + shift) into
    root/calibration.parquet, every call recorded, every 4th held out."""
    with CalibrationRecorder(model, step_range=(0, T_MAX), total_calls=2 * len(steps), max_samples=2 * len(steps),
                             holdout_every=4, **recorder_kwargs) as rec, torch.no_grad():
        for rep in range(2):
            for t in steps:
                with rec.step(t):
                    model(x + shift * rep, t)
        rec.save(root / "calibration.parquet")


def _saved_model(tmp_path_factory, name: str, seed: int):
    """A TinyDenoiser with seeded weights, saved as <tmp>/<name>/model/model.safetensors."""
    torch.manual_seed(seed)
    model = TinyDenoiser()
    root = tmp_path_factory.mktemp(name) / "model"
    _save_model(model, root)
    return model, root


@pytest.fixture(scope="module")
def calibrated_model(tmp_path_factory):
    model, root = _saved_model(tmp_path_factory, "calib", seed=0)
    (root / "config.json").write_text(json.dumps({"architectures": ["DiT"]}))
    steps = list(range(T_MAX - 1, -1, -50))  # 20 steps
    x = _inputs(64, 96, 1)
    _record_two_passes(model, root, x, steps, 0.1, num_bins=4)
    return root


def _quantize(src, out, **cfg):
    cfg.setdefault("min_tensor_size", 0)
    cfg.setdefault("enable_fallback", False)
    cfg.setdefault("sensitive_patterns", [])
    return aq.ArrowQuantV2().quantize_diffusion_model(str(src), str(out), aq.DiffusionQuantConfig(**cfg))


def _worst_output_error(report):
    return {l["tensor"]: max(g["relative_error"] for g in l["output_error"]) for l in report["layers"] if l["quantized"]}


def test_gptq_cuts_output_error_on_held_out_inputs(calibrated_model, tmp_path):
    gptq = _quantize(calibrated_model, tmp_path / "gptq", bit_width=3, group_size=32)
    free = _quantize(calibrated_model, tmp_path / "free", bit_width=3, group_size=32, enable_time_aware=False)
    assert gptq["time_aware"]["applied"] is True, gptq["time_aware"]
    assert not free["time_aware"]["applied"]
    assert gptq["calibration"]["layers_gptq"] == 3 and free["calibration"]["layers_gptq"] == 0
    assert free["calibration"]["layers_calibrated"] == 3  # data-free, but measured in output space
    eg, ef = _worst_output_error(gptq), _worst_output_error(free)
    for name in eg:
        assert eg[name] < 0.85 * ef[name], (name, eg[name], ef[name])
    for layer in gptq["layers"]:
        if layer["quantized"]:
            assert layer["method"] == "gptq"
            assert layer["scheme"] == "int3_g32_asym"
            assert len(layer["output_error"]) == 4  # one per timestep group (4 bins, 10 groups allowed)
            assert all(g["held_out"] for g in layer["output_error"])
            assert 0 < layer["output_cosine"] <= 1


def test_output_error_is_what_the_loaded_model_computes(calibrated_model, tmp_path):
    """The reported per-group error equals ||W X^T - Q X^T|| / ||W X^T|| over the held-out inputs,
    recomputed here from the loaded weights and the calibration file's Hessians."""
    from arrow_quant_v2.calibration import load_calibration

    r = _quantize(calibrated_model, tmp_path / "q", bit_width=4, group_size=64, num_time_groups=4)
    model = aq.load(r["quantized_path"])
    data = load_calibration(calibrated_model / "calibration.parquet")
    src = {}
    from safetensors.numpy import load_file
    src = load_file(str(calibrated_model / "model.safetensors"))
    for layer in r["layers"]:
        if not layer["quantized"]:
            continue
        name = layer["tensor"]
        w = src[name].astype(np.float64)
        q = model[name].numpy().astype(np.float64)
        for g in layer["output_error"]:
            b = g["group"]  # 4 bins, 4 groups: group b is bin b
            entry = data[(name, b, "holdout")]
            h = entry["hessian"] / entry["rows"]
            d = w - q
            expect = np.sqrt(np.sum((d @ h) * d) / np.sum((w @ h) * w))
            assert g["relative_error"] == pytest.approx(expect, rel=1e-6)


def test_time_groups_are_recorded_and_merged(calibrated_model, tmp_path):
    r = _quantize(calibrated_model, tmp_path / "q", bit_width=4, group_size=64, num_time_groups=2)
    groups = r["calibration"]["time_groups"]
    assert len(groups) == 2
    assert sorted(b for g in groups for b in g["bins"]) == [0, 1, 2, 3]
    assert groups[0]["step_lo"] == 0 and groups[-1]["step_hi"] == T_MAX
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["calibration"]["data"]["time_groups"] == groups
    assert set(manifest["calibration"]["data"]["output_error"]) == {"inp.weight", "mid.weight", "out.weight"}
    assert not (tmp_path / "q" / "calibration.parquet").exists()  # input, not part of the model
    for layer in r["layers"]:
        if layer["quantized"]:
            assert len(layer["output_error"]) == 2


def test_single_group_gptq_pools_the_trajectory(calibrated_model, tmp_path):
    r = _quantize(calibrated_model, tmp_path / "q", bit_width=4, group_size=64, num_time_groups=1)
    assert len(r["calibration"]["time_groups"]) == 1
    assert r["time_aware"]["applied"]


def test_explicit_calibration_path_and_missing_file(calibrated_model, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(calibrated_model / "model.safetensors", bare / "model.safetensors")
    r = _quantize(bare, tmp_path / "none", bit_width=4)
    assert not r["time_aware"]["applied"] and "calibration" in r["time_aware"]["reason"]
    assert r["calibration"] is None
    r = _quantize(bare, tmp_path / "given", bit_width=4, calibration_path=str(calibrated_model / "calibration.parquet"))
    assert r["time_aware"]["applied"]
    with pytest.raises(ArrowQuantError, match="no-such.parquet"):
        _quantize(bare, tmp_path / "bad", bit_width=4, calibration_path=str(tmp_path / "no-such.parquet"))
    assert not (tmp_path / "bad").exists()
    not_calib = tmp_path / "weights.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1]}), not_calib)
    with pytest.raises(ArrowQuantError, match="not an ArrowQuant calibration file"):
        _quantize(bare, tmp_path / "bad2", bit_width=4, calibration_path=str(not_calib))


def test_mismatched_calibration_is_not_used(tmp_path, calibrated_model):
    """A calibration recorded for another model (same names, other widths) is reported, not used."""
    other = tmp_path / "other"
    other.mkdir()
    rng = np.random.default_rng(0)
    arrays = {"inp.weight": rng.standard_normal((192, 48)).astype(np.float32)}
    write_safetensors(other / "model.safetensors", [("inp.weight", "F32", (192, 48))], lambda k: arrays[k])
    r = _quantize(other, tmp_path / "q", bit_width=4, calibration_path=str(calibrated_model / "calibration.parquet"))
    assert r["calibration"]["layers_gptq"] == 0
    assert any("96 input features" in w and "48 columns" in w for w in r["warnings"]), r["warnings"]


def test_fallback_uses_output_cosine(calibrated_model, tmp_path):
    r = _quantize(calibrated_model, tmp_path / "q", bit_width=2, group_size=32, enable_fallback=True,
                  min_accuracy=0.9999)
    for layer in r["layers"]:
        if layer["quantized"]:
            assert layer["output_cosine"] >= 0.9999 or layer["bits"] == 8
    assert r["fallbacks"], "2-bit codes cannot reach an output cosine of 0.9999"


def test_inspect_shows_output_errors_per_group(calibrated_model, tmp_path):
    _quantize(calibrated_model, tmp_path / "q", bit_width=4, group_size=64)
    out = subprocess.run([sys.executable, "-m", "arrow_quant_v2.cli", "inspect", str(tmp_path / "q")],
                         capture_output=True, text=True, check=True).stdout
    assert "4 timestep groups" in out and "by GPTQ" in out
    line = next(l for l in out.splitlines() if l.startswith("mid.weight") and "gptq" in l)
    assert len(line.split()) == 3 + 4 + 1  # layer, method, alpha, g0..g3, worst
    assert "quantized to" not in out  # weight-only: no activation table


def test_inspect_shows_equalization_and_errors_with_activations(outlier_model, tmp_path):
    _quantize(outlier_model, tmp_path / "q", bit_width=8, group_size=64, activation_bits=8, num_time_groups=2)
    out = subprocess.run([sys.executable, "-m", "arrow_quant_v2.cli", "inspect", str(tmp_path / "q")],
                         capture_output=True, text=True, check=True).stdout
    assert "channel-equalized" in out and "quantized to 8 bits too" in out
    line = next(l for l in out.splitlines() if l.startswith("inp.weight") and "gptq" in l)
    assert line.split()[2] in ("0.2", "0.35", "0.5", "0.65", "0.8")
    rows = [l for l in out.splitlines() if l.startswith("inp.weight")]
    assert len(rows[-1].split()) == 1 + 2 + 1  # the activation table: layer, g0, g1, worst


def test_cli_calibration_flags(calibrated_model, tmp_path):
    out = subprocess.run([sys.executable, "-m", "arrow_quant_v2.cli", "quantize", str(calibrated_model),
                          str(tmp_path / "q"), "--bits", "4", "--time-groups", "2", "--json", "--quiet",
                          "--min-tensor-size", "0"], capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    assert len(r["calibration"]["time_groups"]) == 2 and r["time_aware"]["applied"]
    out = subprocess.run([sys.executable, "-m", "arrow_quant_v2.cli", "quantize", str(calibrated_model),
                          str(tmp_path / "q2"), "--bits", "4", "--no-time-aware", "--json", "--quiet"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["calibration"]["layers_gptq"] == 0


def test_activation_params_per_timestep_group(calibrated_model, tmp_path):
    """W8A8: per-group activation parameters are stored, loadable by timestep, and (inputs whose
    range moves fivefold with t) beat one static scale on the worst group."""
    r = _quantize(calibrated_model, tmp_path / "q", bit_width=8, group_size=0, activation_bits=8, enable_spatial=False)
    assert r["calibration"]["activation_params"] == "activations.parquet"
    model = aq.load(r["quantized_path"])
    layer = next(l for l in r["layers"] if l["tensor"] == "inp.weight")
    groups = layer["activation"]["groups"]
    assert len(groups) == 4
    worst_group = max(g["relative_error"] for g in groups)
    worst_static = max(g["static_relative_error"] for g in groups)
    assert worst_group < 0.75 * worst_static, (worst_group, worst_static)
    for g in groups:
        assert g["held_out"] and g["relative_error"] <= 1.05 * g["static_relative_error"], g
    for g in groups:
        p = model.activation_params("inp.weight", (g["step_lo"] + g["step_hi"]) / 2)
        assert p["group"] == g["group"] and p["bits"] == 8
        assert p["scale"] == pytest.approx(g["scale"]) and p["zero_point"] == g["zero_point"]
        assert 0 <= p["zero_point"] <= 255
        assert p["clip_lo"] <= 0 <= p["clip_hi"]
    assert model.activation_params("inp.weight", -5)["group"] == 0
    assert model.activation_params("inp.weight", 10 * T_MAX)["group"] == 3
    # the stored parameters on the real held-out inputs: quantize them and compare with the report
    x = _inputs(64, 96, 1).numpy() + 0.1  # the second pass of the recording (held-out calls come from it)
    p = model.activation_params("inp.weight", 900)
    xs = x * (0.5 + 2.0 * 925 / T_MAX)
    c = np.clip(np.round(xs / p["scale"]) + p["zero_point"], 0, 255)
    err = np.sqrt(np.mean((xs - (c - p["zero_point"]) * p["scale"]) ** 2) / np.mean(xs ** 2))
    assert err < 0.05
    with pytest.raises(KeyError, match="no activation parameters"):
        aq.load(_quantize(calibrated_model, tmp_path / "w", bit_width=8)["quantized_path"]).activation_params("inp.weight", 1)


def test_activation_bits_validation():
    with pytest.raises(aq.ConfigurationError, match="activation_bits"):
        aq.DiffusionQuantConfig(activation_bits=6)


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory):
    """TinyDenoiser whose first layer sees two input channels 30-60x larger than the rest (the
    outlier channels of real transformers), with input samples recorded."""
    model, root = _saved_model(tmp_path_factory, "outlier", seed=1)
    steps = list(range(T_MAX - 1, -1, -25))  # 40 steps: fit calls cover each group's range
    x = _inputs(64, 96, 2)
    x[:, 5] *= 60
    x[:, 17] *= 30
    _record_two_passes(model, root, x, steps, 0.1, num_bins=2, input_samples=128)
    return root


def test_channel_equalization_for_w8a8(outlier_model, tmp_path):
    """enable_spatial with activation_bits: the first layer is equalized (its outlier channels
    would otherwise set the per-tensor activation range), which cuts its W8A8 output error; the
    stored weight is W diag(s), input_scale is 1/s, the loader folds it back, validate agrees."""
    from arrow_quant_v2.calibration import load_calibration
    from safetensors.numpy import load_file

    cfg = dict(bit_width=8, group_size=64, activation_bits=8, num_time_groups=2)
    eq = _quantize(outlier_model, tmp_path / "eq", **cfg)
    plain = _quantize(outlier_model, tmp_path / "plain", enable_spatial=False, **cfg)
    assert eq["spatial"]["applied"] is True and eq["calibration"]["layers_equalized"] >= 1, eq["spatial"]
    assert plain["spatial"]["applied"] is False
    layer = next(l for l in eq["layers"] if l["tensor"] == "inp.weight")
    search = layer["equalization"]
    assert search["applied"] and search["alpha"] in (0.2, 0.35, 0.5, 0.65, 0.8)
    assert len(search["candidates"]) == 6 and search["candidates"][0]["alpha"] is None
    assert min(c["score"] for c in search["candidates"]) == next(
        c["score"] for c in search["candidates"] if c["alpha"] == search["alpha"])
    worst = lambda r: max(g["relative_error_with_activations"]  # noqa: E731
                          for g in next(l for l in r["layers"] if l["tensor"] == "inp.weight")["output_error"])
    assert worst(eq) < 0.6 * worst(plain), (worst(eq), worst(plain))

    model = aq.load(eq["quantized_path"])
    assert model.manifest["format_version"] == aq.FORMAT_VERSION == 4
    t = model["inp.weight"]
    a = t.input_scale
    assert a is not None and a.shape == (96,) and np.all(a > 0)
    assert a[5] < np.median(a) and a[17] < np.median(a)  # outlier channels are scaled down
    np.testing.assert_array_equal(t.packed().input_scale, a)
    assert model["out.weight"].input_scale is None or model["out.weight"].input_scale.shape == (192,)
    w = load_file(str(outlier_model / "model.safetensors"))["inp.weight"]
    q = t.numpy()  # effective weight: stored weight times input_scale
    cos = float(np.sum(w * q) / np.linalg.norm(w) / np.linalg.norm(q))
    # (weight space: the scaled outlier columns coarsen their groups; what counts is the output)
    assert cos > 0.99 and cos == pytest.approx(layer["cosine_similarity"], abs=1e-6)

    # relative_error_with_activations recomputed from the held-out samples: y = X W^T against
    # fq(X a) (Q / a)^T, with the group's stored activation parameters
    data = load_calibration(outlier_model / "calibration.parquet")
    for g in layer["output_error"]:
        X = data[("inp.weight", g["group"], "holdout")]["inputs"].astype(np.float64)
        p = model.activation_params("inp.weight", (g["step_lo"] + g["step_hi"]) / 2)
        xa = X * a
        c = np.clip(np.round(xa / p["scale"]) + p["zero_point"], 0, 255)
        xq = (c - p["zero_point"]) * p["scale"]
        rows = np.arange(0, w.shape[0], max(1, w.shape[0] // 256))
        y = X @ w[rows].T.astype(np.float64)
        yq = xq @ (q[rows] / a).T.astype(np.float64)
        expect = np.linalg.norm(y - yq) / np.linalg.norm(y)
        assert g["relative_error_with_activations"] == pytest.approx(expect, rel=2e-3)

    v = aq.ArrowQuantV2().validate_quality(str(outlier_model), eq["quantized_path"])
    assert v["passed"], v
    assert all(l["matches_recorded"] for l in v["layers"] if l.get("quantized", True) and "matches_recorded" in l)


def test_equalization_weight_only_never_worse(calibrated_model, tmp_path):
    """Weight-only: the search includes no equalization, so the chosen layer's score is never
    above it; with enable_spatial=False there is no search at all."""
    r = _quantize(calibrated_model, tmp_path / "eq", bit_width=3, group_size=32)
    for l in r["layers"]:
        if not l["quantized"]:
            continue
        c = l["equalization"]["candidates"]
        assert l["equalization"]["objective"].startswith("mean over timestep groups")
        assert min(x["score"] for x in c) <= c[0]["score"]
    off = _quantize(calibrated_model, tmp_path / "off", bit_width=3, group_size=32, enable_spatial=False)
    assert all("equalization" not in l for l in off["layers"])
    assert off["spatial"]["applied"] is False


def test_relative_time_group_weights(calibrated_model, tmp_path):
    """time_group_weighting='relative': GPTQ weighs each timestep group by 1 / its output energy (the
    model's inputs grow with t, so the early groups get the larger weights); the report says so."""
    u = _quantize(calibrated_model, tmp_path / "u", bit_width=3, group_size=32, num_time_groups=4, enable_spatial=False)
    r = _quantize(calibrated_model, tmp_path / "r", bit_width=3, group_size=32, num_time_groups=4, enable_spatial=False,
                  time_group_weighting="relative")
    assert "1 / the group's output energy" in r["time_aware"]["reason"]
    assert "uniform weights" in u["time_aware"]["reason"]
    for lu, lr in zip(u["layers"], r["layers"]):
        if not lu["quantized"]:
            continue
        assert lu["time_group_weights"] == [0.25] * 4
        w = lr["time_group_weights"]
        assert sum(w) == pytest.approx(1.0) and w == sorted(w, reverse=True) and w[0] > 2 * w[-1], w
    # the low-t (low-energy) group gains, in relative error, from its larger weight (inp's groups
    # differ only by a scale, and GPTQ does not change with the Hessian's scale: equal there)
    g0 = [(lr["output_error"][0]["relative_error"], lu["output_error"][0]["relative_error"])
          for lu, lr in zip(u["layers"], r["layers"]) if lu["quantized"]]
    # (GPTQ is greedy, so a single layer may move either way by a little; over the layers it gains)
    assert sum(a for a, _ in g0) < sum(b for _, b in g0), g0
    with pytest.raises(aq.ConfigurationError, match="time_group_weighting"):
        aq.DiffusionQuantConfig(time_group_weighting="by-magic")


class ConvDenoiser(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 32, 3, padding=1)
        self.head = torch.nn.Conv2d(32, 8, 1)

    def forward(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return self.head(torch.nn.functional.silu(self.conv(x * (0.5 + t / T_MAX))))


def test_convolution_equalization_end_to_end(tmp_path):
    """A convolution's input channel spans its kernel positions: input_scale has in_channels
    values, the loader folds them over each channel's 3x3 columns, validate agrees."""
    torch.manual_seed(4)
    model = ConvDenoiser()
    root = tmp_path / "model"
    state = _save_model(model, root)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 8, 6, 6, generator=g)
    x[:, 2] *= 40  # an outlier input channel
    steps = list(range(T_MAX - 1, -1, -50))
    _record_two_passes(model, root, x, steps, 0.05, num_bins=2, input_samples=256)
    r = _quantize(root, tmp_path / "q", bit_width=8, group_size=32, activation_bits=8, num_time_groups=2)
    layer = next(l for l in r["layers"] if l["tensor"] == "conv.weight")
    assert layer["equalization"]["applied"], layer["equalization"]
    q = aq.load(r["quantized_path"])
    a = q["conv.weight"].input_scale
    assert a.shape == (8,) and a[2] == a.min()
    # the stored codes decode (docs/format.md, int8 g32 asymmetric) to W diag(1 / input_scale);
    # times input_scale over each channel's 9 columns, that is what numpy() returns
    p = q["conv.weight"].packed()
    assert p.bits == 8 and p.group_size == 32
    codes = np.frombuffer(p.codes, np.uint8).astype(np.float32).reshape(32, 72)
    s_ = np.repeat(p.scales.astype(np.float32).reshape(32, -1), 32, axis=1)[:, :72]
    z_ = np.repeat(p.zero_points.astype(np.float32).reshape(32, -1), 32, axis=1)[:, :72]
    stored = s_ * codes + z_
    np.testing.assert_array_equal(stored * np.repeat(a, 9)[None, :], q["conv.weight"].numpy().reshape(32, 72))
    w = state["conv.weight"]
    cos = float(np.sum(w * q["conv.weight"].numpy()) / np.linalg.norm(w) / np.linalg.norm(q["conv.weight"].numpy()))
    assert cos == pytest.approx(layer["cosine_similarity"], abs=1e-6) and cos > 0.99
    v = aq.ArrowQuantV2().validate_quality(str(root), r["quantized_path"])
    assert v["passed"], v


def test_convolutions_without_a_hessian_stay_at_8_bits(tmp_path):
    """Modality strategy: a spatial convolution that calibration recorded no Hessian for (here
    wider than max_hessian_features) is quantized at 8 bits, not low-bit data-free; a 1x1
    convolution and text models are left to the configured bits."""
    torch.manual_seed(4)
    model = ConvDenoiser()
    root = tmp_path / "model"
    state = _save_model(model, root)
    x = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(5))
    with CalibrationRecorder(model, num_bins=2, max_samples=4, max_hessian_features=16) as rec, torch.no_grad():
        for t in (900, 600, 300, 100):
            with rec.step(t):
                model(x, t)
        rec.save(root / "calibration.parquet")
    r = _quantize(root, tmp_path / "q", bit_width=4, group_size=32, modality="image")
    by = {l["tensor"]: l for l in r["layers"]}
    assert by["conv.weight"]["bits"] == 8 and "without a calibration Hessian" in by["conv.weight"]["reason"]
    assert by["head.weight"]["bits"] == 4  # 1x1: no spatial kernel
    t = _quantize(root, tmp_path / "t", bit_width=4, group_size=32, modality="text")
    assert {l["tensor"]: l for l in t["layers"]}["conv.weight"]["bits"] == 4


def test_resume_with_calibration_is_byte_identical(outlier_model, tmp_path):
    """A calibrated W8A8 run (GPTQ, equalization, activation parameters, output errors) stopped
    after its first tensor and resumed gives the same files as an uninterrupted run."""
    from conftest import tree_digest

    from arrow_quant_v2 import _core

    cfg = aq.DiffusionQuantConfig(min_tensor_size=0, enable_fallback=False, sensitive_patterns=[], bit_width=8,
                                  group_size=0, activation_bits=8)
    straight = json.loads(_core.quantize_model(str(outlier_model), str(tmp_path / "straight"), cfg._engine_json(),
                                               None, 10, 5.0, False))
    assert straight["calibration"]["activation_params"] == "activations.parquet"
    assert straight["calibration"]["layers_equalized"] >= 1

    def stop_after_one(done, total, *rest):
        return done >= 1

    with pytest.raises(KeyboardInterrupt, match="kept in"):
        _core.quantize_model(str(outlier_model), str(tmp_path / "out"), cfg._engine_json(), stop_after_one, 1, 0.0, True)
    resumed = json.loads(_core.quantize_model(str(outlier_model), str(tmp_path / "out"), cfg._engine_json(),
                                              None, 10, 5.0, True))
    assert resumed["resume"]["tensors"] >= 1

    assert tree_digest(tmp_path / "out") == tree_digest(tmp_path / "straight")
    for key in ("layers", "calibration", "skipped", "fallbacks", "time_aware", "spatial"):
        assert resumed[key] == straight[key], key
