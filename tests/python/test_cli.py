"""The arrowquant command line: quantize, validate, inspect, generate-demo."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import arrow_quant_v2 as aq
from arrow_quant_v2 import ArrowQuantV2, DiffusionQuantConfig
from arrow_quant_v2.cli import main
from arrow_quant_v2.demo import generate_demo_pipeline

from conftest import layer_weights, leftovers, tree_digest, write_model_file


@pytest.fixture
def cli_model(tmp_path, rng):
    src = tmp_path / "src"
    src.mkdir()
    arrays = layer_weights(rng, 12, shape=(64, 96))
    arrays["blocks.0.linear.bias"] = rng.standard_normal(64).astype(np.float32)
    write_model_file(src / "model.safetensors", arrays)
    (src / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel"}))
    return src, arrays


def run_json(capsys, argv):
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, json.loads(captured.out), captured.err


def test_quantize_json_output_has_the_api_keys(cli_model, tmp_path, capsys):
    src, _ = cli_model
    rc, report, _ = run_json(capsys, ["quantize", str(src), str(tmp_path / "cli"), "--json"])
    assert rc == 0
    api = ArrowQuantV2().quantize_diffusion_model(src, tmp_path / "api")
    assert set(report) == set(api)
    assert report["compression_ratio"] == api["compression_ratio"]
    assert report["cosine_similarity"] == api["cosine_similarity"]
    assert report["bit_width"] == 4


@pytest.mark.parametrize("profile", ["edge", "local", "cloud"])
def test_quantize_with_a_profile_uses_its_settings(cli_model, tmp_path, capsys, profile):
    src, _ = cli_model
    rc, report, _ = run_json(capsys, ["quantize", str(src), str(tmp_path / "out"), "--profile", profile,
                                      "--json", "--no-fallback"])
    assert rc == 0
    expected = DiffusionQuantConfig.from_profile(profile)
    assert report["deployment_profile"] == profile
    assert (report["bit_width"], report["group_size"], report["symmetric"]) == \
        (expected.bit_width, expected.group_size, expected.symmetric)
    model = aq.load(tmp_path / "out")
    # the profile's ggml type, or the 32-weight block type for rows that are no multiple of 256
    fallback = "iq4_nl" if expected.bit_width <= 4 else "q8_0"
    schemes = {model[n].scheme for n in model.tensor_names() if model[n].quantized}
    assert schemes and schemes <= {expected.scheme, fallback}, schemes


def test_bits_and_group_size_flags_override_the_profile(cli_model, tmp_path, capsys):
    src, _ = cli_model
    rc, report, _ = run_json(capsys, ["quantize", str(src), str(tmp_path / "out"), "--profile", "edge",
                                      "--scheme", "affine", "--bits", "3", "--group-size", "32", "--json",
                                      "--no-fallback"])
    assert rc == 0
    assert (report["bit_width"], report["group_size"]) == (3, 32)
    for layer in report["layers"]:
        if layer["quantized"]:
            assert (layer["bits"], layer["group_size"]) == (3, 32)


def test_quantize_prints_a_summary_and_progress_lines(cli_model, tmp_path, capsys):
    src, arrays = cli_model
    rc = main(["quantize", str(src), str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc == 0
    assert "compression" in captured.out and "cosine" in captured.out
    assert f"/{len(arrays)}" in captured.err  # plain progress lines on a non-terminal stderr


def test_quiet_quantize_writes_no_progress(cli_model, tmp_path, capsys):
    src, _ = cli_model
    assert main(["quantize", str(src), str(tmp_path / "out"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_validate_exits_0_when_the_model_passes(cli_model, tmp_path, capsys):
    src, _ = cli_model
    assert main(["quantize", str(src), str(tmp_path / "out"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["validate", str(src), str(tmp_path / "out")]) == 0
    assert "PASSED" in capsys.readouterr().out
    rc, report, _ = run_json(capsys, ["validate", str(src), str(tmp_path / "out"), "--json"])
    assert rc == 0 and report["passed"] is True


def test_validate_exits_1_when_the_model_fails(cli_model, tmp_path, capsys):
    src, _ = cli_model
    assert main(["quantize", str(src), str(tmp_path / "out"), "--quiet", "--bits", "2", "--min-accuracy", "0.99",
                 "--no-fallback"]) == 0
    capsys.readouterr()
    assert main(["validate", str(src), str(tmp_path / "out")]) == 1
    assert "FAILED" in capsys.readouterr().out


def _table_rows(text):
    lines = text.splitlines()
    header_idx = next(i for i, l in enumerate(lines) if l.startswith("layer "))
    header = lines[header_idx].split()
    rows = []
    for line in lines[header_idx + 2:]:
        if not line.strip() or line.startswith("("):
            break
        rows.append(dict(zip(header, line.split())))
    return rows


def test_inspect_prints_a_table_of_layers_and_schemes(cli_model, tmp_path, capsys):
    src, arrays = cli_model
    assert main(["quantize", str(src), str(tmp_path / "out"), "--quiet", "--bits", "3", "--group-size", "32",
                 "--no-fallback"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "out"), "--all"]) == 0
    out = capsys.readouterr().out
    rows = {r["layer"]: r for r in _table_rows(out)}
    assert set(rows) == set(arrays)
    model = aq.load(tmp_path / "out")
    for name in arrays:
        assert rows[name]["scheme"] == model[name].scheme
    assert {model[n].scheme for n in arrays if model[n].quantized} == {"int3_g32_asym"}


def test_inspect_bits_per_weight_column_is_stored_bits_over_weights(cli_model, tmp_path, capsys):
    src, arrays = cli_model
    assert main(["quantize", str(src), str(tmp_path / "out"), "--quiet", "--no-fallback"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "out")]) == 0
    rows = {r["layer"]: r for r in _table_rows(capsys.readouterr().out)}
    model = aq.load(tmp_path / "out")
    for name, a in arrays.items():
        t = model[name]
        if t.quantized:
            expected = 8 * t.stored_bytes / a.size
            assert float(rows[name]["bits/w"]) == pytest.approx(expected, abs=0.006), name


def test_inspect_json_holds_the_manifest_and_every_tensor(cli_model, tmp_path, capsys):
    src, arrays = cli_model
    assert main(["quantize", str(src), str(tmp_path / "out"), "--quiet"]) == 0
    capsys.readouterr()
    rc, info, _ = run_json(capsys, ["inspect", str(tmp_path / "out"), "--json"])
    assert rc == 0
    assert info["manifest"] == json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [t["name"] for t in info["tensors"]] == list(arrays)


def test_inspect_of_a_source_pipeline_describes_its_components(demo_pipeline, capsys):
    rc, info, _ = run_json(capsys, ["inspect", demo_pipeline, "--json"])
    assert rc == 0
    assert info["layout"] == "diffusers" and info["modality"] == "image"
    selected = {c["name"]: c["selected"] for c in info["components"]}
    assert selected == {"text_encoder": False, "unet": True, "vae": False}
    assert main(["inspect", demo_pipeline]) == 0
    assert "unet" in capsys.readouterr().out


def test_missing_model_exits_2_with_an_error_on_stderr(tmp_path, capsys):
    missing = tmp_path / "missing-model"
    rc = main(["quantize", str(missing), str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc == 2
    assert "error" in captured.err and str(missing) in captured.err
    assert captured.out == ""
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_configuration_errors_exit_2(cli_model, tmp_path, capsys):
    src, _ = cli_model
    rc = main(["quantize", str(src), str(src / "inside"), "--quiet"])
    assert rc == 2
    assert "inside" in capsys.readouterr().err


def test_invalid_flag_values_are_rejected_by_the_parser(cli_model, tmp_path, capsys):
    src, _ = cli_model
    with pytest.raises(SystemExit) as info:
        main(["quantize", str(src), str(tmp_path / "out"), "--bits", "7"])
    assert info.value.code == 2
    assert not (tmp_path / "out").exists()


def test_generate_demo_writes_the_built_in_pipeline(tmp_path, capsys):
    out = tmp_path / "demo"
    rc, summary, _ = run_json(capsys, ["generate-demo", str(out), "--base-channels", "32", "--json"])
    assert rc == 0
    ref = tmp_path / "ref"
    expected = generate_demo_pipeline(ref, base_channels=32)
    assert tree_digest(out) == tree_digest(ref)
    assert summary["components"] == expected["components"]
    for comp, c in summary["components"].items():
        fname = "model.safetensors" if comp == "text_encoder" else "diffusion_pytorch_model.safetensors"
        assert os.path.getsize(out / comp / fname) == c["bytes"]
    # refuses to replace an existing directory without --overwrite
    with pytest.raises(FileExistsError):
        main(["generate-demo", str(out), "--base-channels", "32"])


def test_the_installed_command_runs_in_a_subprocess(cli_model, tmp_path):
    src, arrays = cli_model
    out = tmp_path / "sub-out"
    proc = subprocess.run([sys.executable, "-m", "arrow_quant_v2.cli", "quantize", str(src), str(out),
                           "--profile", "edge", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["bit_width"] == 2 and report["deployment_profile"] == "edge"
    assert len(aq.load(out)) == len(arrays)
    missing = subprocess.run([sys.executable, "-m", "arrow_quant_v2.cli", "validate", str(tmp_path / "nope"),
                              str(out)], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert "nope" in missing.stderr


def test_demo_quantizes_the_built_in_model_and_validates_it(tmp_path, capsys):
    root = tmp_path / "demo-out"
    rc = main(["demo", "--out", str(root), "--profiles", "edge", "local", "--base-channels", "32", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    for profile in ("edge", "local"):
        assert (root / f"model-{profile}" / "manifest.json").exists()
        assert profile in out
    assert not (root / "model-cloud").exists()
    report = ArrowQuantV2().validate_quality(root / "model", root / "model-edge")
    assert report["passed"] is True


def test_demo_json_output_is_valid_json(tmp_path, capsys):
    root = tmp_path / "demo-out"
    rc = main(["demo", "--out", str(root), "--profiles", "edge", "--base-channels", "32", "--quiet", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    results = json.loads(out)  # --json: stdout holds the JSON document only
    assert set(results) == {"edge"}
    assert results["edge"]["quantize"]["bit_width"] == 2
    assert results["edge"]["validate"]["passed"] is True
