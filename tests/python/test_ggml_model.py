"""Whole models quantized to ggml's block types: what is stored, what load() gives back, what the
report says, and the layer policy with ggml schemes (row-length fallbacks, sensitive layers at
Q8_0, layers no block type takes), the profiles, and calibration-weighted encoding."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import arrow_quant_v2 as aq
from arrow_quant_v2 import ArrowQuantV2, DiffusionQuantConfig

from conftest import write_model_file

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

ROW_BYTES = {"q8_0": (32, 34), "q6_k": (256, 210), "q5_k": (256, 176), "q4_k": (256, 144), "q3_k": (256, 110),
             "q2_k": (256, 84), "iq4_xs": (256, 136), "iq4_nl": (32, 18)}


def _model(rng) -> dict:
    return {
        "blocks.0.attn.to_q.weight": rng.normal(0, 0.02, (64, 512)).astype(np.float32),      # K types fit
        "blocks.0.ff.net.weight": rng.normal(0, 0.02, (48, 1152)).astype(np.float32),        # 1152 = 4.5 x 256
        "blocks.0.conv.weight": rng.normal(0, 0.05, (32, 32, 3, 3)).astype(np.float32),      # rows of 288
        "blocks.0.odd.weight": rng.normal(0, 0.02, (64, 40)).astype(np.float32),             # 40: no block fits
        "proj_out.weight": rng.normal(0, 0.02, (32, 512)).astype(np.float32),                # sensitive
        "blocks.0.attn.to_q.bias": rng.normal(0, 0.02, (64,)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("ggml")
    arrays = _model(rng)
    src = write_model_file(root / "model.safetensors", arrays)
    result = ArrowQuantV2().quantize_diffusion_model(
        src, root / "out", DiffusionQuantConfig(scheme="q4_k", enable_fallback=False))
    return arrays, root / "out", result


def test_each_layer_gets_the_type_its_row_length_allows(quantized):
    arrays, out, result = quantized
    layers = {l["tensor"]: l for l in result["layers"]}
    assert layers["blocks.0.attn.to_q.weight"]["scheme"] == "q4_k"
    ff = layers["blocks.0.ff.net.weight"]
    assert ff["scheme"] == "iq4_nl"
    assert "q4_k needs rows of a multiple of 256 weights, these hold 1152: iq4_nl" in ff["reason"]
    assert layers["blocks.0.conv.weight"]["scheme"] == "iq4_nl"
    odd = layers["blocks.0.odd.weight"]
    assert not odd["quantized"] and "fit no ggml block type" in odd["reason"]
    assert layers["proj_out.weight"]["scheme"] == "q8_0"  # sensitive layers: the ggml type of 8 bits
    assert not layers["blocks.0.attn.to_q.bias"]["quantized"]


def test_stored_codes_are_the_types_bytes_and_numpy_equals_ggml_decoding_bit_for_bit(quantized):
    arrays, out, _ = quantized
    model = aq.load(out)
    for name, a in arrays.items():
        t = model[name]
        if not t.quantized:
            continue
        p = t.packed()
        rows = a.shape[0]
        cols = a.size // rows
        block, nbytes = ROW_BYTES[t.scheme]
        assert p.ggml_type == t.scheme.upper()
        assert p.scales is None and p.zero_points is None
        assert len(p.codes) == rows * cols // block * nbytes == t.stored_bytes
        theirs = gguf_dequantize(np.frombuffer(p.codes, np.uint8).reshape(rows, -1),
                                 getattr(gguf.GGMLQuantizationType, p.ggml_type)).astype(np.float32)
        ours = t.numpy().reshape(rows, cols)
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), name
        assert t.numpy().shape == a.shape


def test_weights_parquet_names_the_type_and_the_manifest_is_version_3(quantized):
    _, out, _ = quantized
    rows = {r["name"]: r for r in pq.read_table(out / "weights.parquet").to_pylist()}
    s = rows["blocks.0.attn.to_q.weight"]["scheme"]
    assert (s["kind"], s["bits"], s["group_size"], s["symmetric"]) == ("q4_k", 4, 256, False)
    assert rows["proj_out.weight"]["scheme"]["kind"] == "q8_0"
    assert rows["blocks.0.attn.to_q.weight"]["scales"] == b""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 4
    assert pq.ParquetFile(out / "weights.parquet").schema_arrow.metadata[b"arrowquant.format_version"] == b"4"


def test_validate_and_inspect_read_ggml_models(quantized, capsys):
    arrays, out, _ = quantized
    src = out.parent / "model.safetensors"
    report = ArrowQuantV2().validate_quality(str(src), str(out))
    assert report["passed"], report
    from arrow_quant_v2.cli import main

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "q4_k" in text and "iq4_nl" in text and "q8_0" in text


@pytest.mark.parametrize("profile,types", [("edge", {"q2_k", "q3_k", "q4_k", "iq4_nl", "q8_0"}),
                                           ("local", {"q4_k", "iq4_nl", "q8_0"}),
                                           ("cloud", {"q8_0"})])
def test_profiles_produce_only_ggml_types(profile, types, tmp_path):
    rng = np.random.default_rng(5)
    arrays = _model(rng)
    del arrays["blocks.0.odd.weight"]
    src = write_model_file(tmp_path / "model.safetensors", arrays)
    result = ArrowQuantV2().quantize_diffusion_model(src, tmp_path / "out", DiffusionQuantConfig.from_profile(profile))
    got = {l["scheme"] for l in result["layers"] if l["quantized"]}
    assert got and got <= types, got
    expected = {"edge": "q2_k", "local": "q4_k", "cloud": "q8_0"}[profile]
    assert {l["scheme"] for l in result["layers"] if l["tensor"] == "blocks.0.attn.to_q.weight"} <= \
        {expected, "q3_k", "q4_k", "q8_0"}


def test_a_fallback_climbs_ggml_types(tmp_path):
    rng = np.random.default_rng(6)
    # heavy-tailed rows: Q2_K falls below min_accuracy 0.99, the ladder goes up through the K types
    w = (rng.standard_t(2, (32, 512)) * 0.02).astype(np.float32)
    src = write_model_file(tmp_path / "model.safetensors", {"blocks.0.w.weight": w})
    result = ArrowQuantV2().quantize_diffusion_model(
        src, tmp_path / "out", DiffusionQuantConfig(scheme="q2_k", min_accuracy=0.99))
    layer = result["layers"][0]
    assert layer["rejected_bits"][:1] == [2]
    assert layer["scheme"] in ("q3_k", "q4_k", "q8_0")
    assert layer["cosine_similarity"] >= 0.99


def test_in_memory_quantize_takes_ggml_schemes():
    rng = np.random.default_rng(7)
    a = rng.normal(0, 0.02, (16, 256)).astype(np.float32)
    q = ArrowQuantV2().quantize({"w": a}, config=DiffusionQuantConfig(scheme="q6_k", enable_fallback=False))["w"]
    assert q.scheme == "q6_k" and q.bits == 6
    assert len(q.codes) == 16 * 210
    theirs = gguf_dequantize(np.frombuffer(q.codes, np.uint8).reshape(16, -1), gguf.GGMLQuantizationType.Q6_K)
    assert np.array_equal(q.dequantize().view(np.uint32), theirs.astype(np.float32).view(np.uint32))


def test_ggml_schemes_with_calibration_run_gptq_on_the_grid_with_timestep_group_importance(tmp_path):
    torch = pytest.importorskip("torch")
    from arrow_quant_v2.calibration import CalibrationRecorder

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
    root = tmp_path / "model"
    root.mkdir()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    write_model_file(root / "model.safetensors", state)
    g = torch.Generator().manual_seed(1)
    scale = torch.exp(2.0 * torch.randn(256, generator=g))  # unevenly scaled input features
    steps = list(range(0, 1000, 50))
    with CalibrationRecorder(model, step_range=(0, 1000), total_calls=len(steps), holdout_every=4) as rec, \
            torch.no_grad():
        for t in steps:
            with rec.step(t):
                model(torch.randn(64, 256, generator=g) * scale * (0.5 + t / 1000))
        rec.save(root / "calibration.parquet")

    q = ArrowQuantV2()
    cfg = DiffusionQuantConfig(scheme="q3_k", enable_fallback=False, num_time_groups=4)
    weighted = q.quantize_diffusion_model(root, tmp_path / "weighted", cfg)
    plain = q.quantize_diffusion_model(root, tmp_path / "plain", cfg.replace(enable_time_aware=False))
    assert weighted["time_aware"]["applied"] is True, weighted["time_aware"]
    assert "GPTQ on the ggml grids" in weighted["time_aware"]["reason"]
    assert weighted["spatial"]["applied"] is False and "ggml" in weighted["spatial"]["reason"]
    first_w = next(l for l in weighted["layers"] if l["tensor"] == "0.weight")
    first_p = next(l for l in plain["layers"] if l["tensor"] == "0.weight")
    assert first_w["method"] == "gptq" and first_p["method"] == "data-free"
    assert first_w["scheme"] == first_p["scheme"] == "q3_k"
    mean = lambda l: float(np.mean([g["relative_error"] for g in l["output_error"]]))  # noqa: E731
    # the uneven input scales make importance matter: less output error on held-out inputs
    assert mean(first_w) < 0.8 * mean(first_p), (mean(first_w), mean(first_p))
    print("output error, GPTQ on the grid vs data-free:", mean(first_w), mean(first_p))
    # the stored bytes are still the type's blocks, decoded bit for bit by ggml's decoder
    t = aq.load(tmp_path / "weighted")["0.weight"]
    theirs = gguf_dequantize(np.frombuffer(t.packed().codes, np.uint8).reshape(512, -1), gguf.GGMLQuantizationType.Q3_K)
    assert np.array_equal(t.numpy().view(np.uint32), theirs.astype(np.float32).view(np.uint32))


def _budget_model(rng) -> dict:
    """Layers of unlike sensitivity: Gaussian, heavy-tailed, one with outlier columns, a small
    sensitive projection, and a wide one."""
    a = {f"blocks.{i}.ff.weight": rng.normal(0, 0.02, (128, 1024)).astype(np.float32) for i in range(3)}
    a["blocks.3.ff.weight"] = (rng.standard_t(3, (128, 1024)) * 0.02).astype(np.float32)
    w = rng.normal(0, 0.02, (128, 1024)).astype(np.float32)
    w[:, ::50] *= 25
    a["blocks.4.ff.weight"] = w
    a["time_embedding.linear_1.weight"] = rng.normal(0, 0.02, (64, 256)).astype(np.float32)
    return a


@pytest.mark.parametrize("target", [3.0, 4.8])
def test_a_model_budget_mixes_types_by_measured_sensitivity_within_the_budget(target, tmp_path):
    arrays = _budget_model(np.random.default_rng(8))
    src = write_model_file(tmp_path / "model.safetensors", arrays)
    q = ArrowQuantV2()
    cfg = DiffusionQuantConfig(scheme="q4_k", target_bits_per_weight=target, enable_fallback=False)
    result = q.quantize_diffusion_model(src, tmp_path / "out", cfg)
    layers = [l for l in result["layers"] if l["quantized"]]
    bits = sum(8 * l["stored_bytes"] for l in layers) / sum(arrays[l["tensor"]].size for l in layers)
    assert bits <= target + 1e-9, bits
    assert bits >= target - 1.0, bits  # the budget is used, not left on the table
    assert result["budget"]["target_bits_per_weight"] == target
    types = {l["tensor"]: l["scheme"] for l in layers}
    assert len(set(types.values())) >= 2, types  # a mix, not one type
    assert all("model budget" in l["reason"] for l in layers)
    # the outlier-column layer, the sensitive projection, and the heavy tails get no less than
    # a plain Gaussian layer
    rank = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0"]
    plain = rank.index(types["blocks.0.ff.weight"])
    assert rank.index(types["blocks.4.ff.weight"]) >= plain
    assert rank.index(types["time_embedding.linear_1.weight"]) >= plain
    # against the largest single type within the budget for every layer: less total relative error
    uniform = "q2_k" if target == 3.0 else "q4_k"
    single = q.quantize_diffusion_model(src, tmp_path / "single",
                                        DiffusionQuantConfig(scheme=uniform, enable_fallback=False,
                                                             sensitive_bit_width=int(uniform[1])))
    cost = lambda r: sum(l["relative_error"] ** 2 for l in r["layers"] if l["quantized"])  # noqa: E731
    single_bits = sum(8 * l["stored_bytes"] for l in single["layers"] if l["quantized"]) / \
        sum(arrays[l["tensor"]].size for l in single["layers"] if l["quantized"])
    assert single_bits <= target
    assert cost(result) < cost(single), (cost(result), cost(single))


def test_a_model_budget_outside_what_ggml_types_can_meet_is_a_configuration_error(tmp_path):
    with pytest.raises(aq.ConfigurationError, match="target_bits_per_weight"):
        src = write_model_file(tmp_path / "model.safetensors", _budget_model(np.random.default_rng(1)))
        ArrowQuantV2().quantize_diffusion_model(src, tmp_path / "out",
                                                DiffusionQuantConfig(scheme="q4_k", target_bits_per_weight=2.0))


@pytest.mark.parametrize("weighting", ["magnitude", "llama"])
def test_magnitude_weightings_keep_large_weights_closer_at_some_cost_in_plain_error(weighting):
    rng = np.random.default_rng(9)
    a = (rng.standard_t(3, (32, 1024)) * 0.02).astype(np.float32)
    q = ArrowQuantV2()
    assert DiffusionQuantConfig().ggml_weighting == "llama"  # the default
    plain = q.quantize({"w": a}, config=DiffusionQuantConfig(scheme="q3_k", enable_fallback=False,
                                                             ggml_weighting="plain"))["w"]
    mag = q.quantize({"w": a}, config=DiffusionQuantConfig(scheme="q3_k", enable_fallback=False,
                                                           ggml_weighting=weighting))["w"]
    big = np.abs(a) > np.quantile(np.abs(a), 0.99)
    err = lambda x: np.abs(x.dequantize() - a)  # noqa: E731
    assert err(mag)[big].mean() < err(plain)[big].mean()
    assert np.linalg.norm(plain.dequantize() - a) < np.linalg.norm(mag.dequantize() - a)
    with pytest.raises(aq.ConfigurationError, match="ggml_weighting"):
        DiffusionQuantConfig(ggml_weighting="x")


def test_a_nan_weight_with_a_ggml_scheme_is_an_error_naming_it_or_kept_by_policy(tmp_path):
    rng = np.random.default_rng(10)
    w = rng.normal(0, 0.02, (16, 256)).astype(np.float32)
    w[3, 100] = np.nan
    src = write_model_file(tmp_path / "model.safetensors", {"blocks.0.w.weight": w})
    with pytest.raises(aq.NonFiniteWeightError, match=r"blocks\.0\.w\.weight.*\[3, 100\].*NaN"):
        ArrowQuantV2().quantize_diffusion_model(src, tmp_path / "out", DiffusionQuantConfig(scheme="q4_k", fail_fast=True))
    assert not (tmp_path / "out").exists()
    r = ArrowQuantV2().quantize_diffusion_model(src, tmp_path / "kept",
                                                DiffusionQuantConfig(scheme="q4_k", nonfinite="keep"))
    assert not r["layers"][0]["quantized"]


def test_with_calibration_the_model_budget_weighs_each_layers_output_error(tmp_path):
    torch = pytest.importorskip("torch")
    from arrow_quant_v2.calibration import CalibrationRecorder

    class Four(torch.nn.Module):  # four layers alike in their weights, unlike in their inputs
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = (torch.nn.Linear(512, 256, bias=False) for _ in range(4))

        def forward(self, xs):
            return [m(x) for m, x in zip((self.a, self.b, self.c, self.d), xs)]

    torch.manual_seed(0)
    model = Four()
    with torch.no_grad():  # b's weights are heavy-tailed: by weight error alone it needs the most bits
        model.b.weight.copy_(torch.distributions.StudentT(3.0).sample(model.b.weight.shape) * 0.02)
    root = tmp_path / "model"
    root.mkdir()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    write_model_file(root / "model.safetensors", state)
    g = torch.Generator().manual_seed(1)
    uneven = torch.exp(2.0 * torch.randn(512, generator=g))  # b: a few input features dominate
    basis = torch.randn(8, 512, generator=g)                  # c: inputs in an 8-dimensional subspace
    steps = list(range(0, 1000, 100))
    with CalibrationRecorder(model, step_range=(0, 1000), total_calls=len(steps), holdout_every=4) as rec, \
            torch.no_grad():
        for t in steps:
            with rec.step(t):
                model([torch.randn(128, 512, generator=g), torch.randn(128, 512, generator=g) * uneven,
                       torch.randn(128, 8, generator=g) @ basis, torch.randn(128, 512, generator=g)])
        rec.save(root / "calibration.parquet")

    q = ArrowQuantV2()
    cfg = DiffusionQuantConfig(scheme="q4_k", target_bits_per_weight=4.0, enable_fallback=False, num_time_groups=2)
    cal = q.quantize_diffusion_model(root, tmp_path / "cal", cfg)
    assert cal["budget"]["calibrated_layers"] == 4
    layers = [l for l in cal["layers"] if l["quantized"]]
    assert all("sampled relative output error" in l["reason"] for l in layers), [l["reason"] for l in layers]
    bits = sum(8 * l["stored_bytes"] for l in layers) / sum(state[l["tensor"]].size for l in layers)
    assert bits <= 4.0 + 1e-9
    # by weight error alone b takes the most bits; under its inputs (a few features dominate, and
    # the encoder weighs them) its output error is small, and its bits go elsewhere
    free = q.quantize_diffusion_model(root, tmp_path / "free", cfg.replace(enable_time_aware=False))
    assert free["budget"]["calibrated_layers"] == 0
    assert all("sampled relative weight error" in l["reason"] for l in free["layers"] if l["quantized"])
    rank = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0"]
    cal_t = {l["tensor"]: l["scheme"] for l in layers}
    free_t = {l["tensor"]: l["scheme"] for l in free["layers"] if l["quantized"]}
    assert rank.index(cal_t["b.weight"]) < rank.index(free_t["b.weight"]), (cal_t, free_t)
    # the weight-error allocation, quantized with the same calibration, has more output error on
    # the held-out inputs than the output-error allocation
    fixed = q.quantize_diffusion_model(root, tmp_path / "fixed", cfg.replace(
        target_bits_per_weight=None, bit_overrides={f"^{k}$": int(v[1]) for k, v in free_t.items()}))
    assert {l["tensor"]: l["scheme"] for l in fixed["layers"] if l["quantized"]} == free_t
    out_err = lambda r: sum(g["relative_error"] ** 2 for l in r["layers"] if l["quantized"]  # noqa: E731
                            for g in l["output_error"])
    assert out_err(cal) < out_err(fixed), (out_err(cal), out_err(fixed))
