"""The quality report (arrowquant report, arrow_quant_v2.report, quantize_diffusion_model(report=True)):
one self-contained HTML page whose plots and numbers are the model's, rendered by headless
Chromium without a console error."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import arrow_quant_v2 as aq  # noqa: E402
from arrow_quant_v2 import cli  # noqa: E402
from arrow_quant_v2.quality_report import bits_views, collect  # noqa: E402


def _page(path):
    with open(path, "r", encoding="utf-8") as f:
        return f.read()


def _data(page):
    m = re.search(r"<script type='application/json' id='report-data'>(.*?)</script>", page, re.S)
    assert m, "the page embeds its data"
    return json.loads(m.group(1).replace("<\\/", "</"))


def _images(page):
    found = re.findall(r"<img id='([\w-]+)' alt='[^']*' src='data:image/png;base64,([A-Za-z0-9+/=]+)'>", page)
    for _, b64 in found:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    return [name for name, _ in found]


def _self_contained(page):
    assert not re.search(r"""(src|href)\s*=\s*['"](?!data:)""", page), "nothing is loaded from elsewhere"
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert not re.search(r"<script(?![^>]*application/json)", page), "no script runs"


@pytest.fixture(scope="module")
def data_free(tmp_path_factory):
    root = tmp_path_factory.mktemp("datafree")
    rng = np.random.default_rng(3)
    (root / "model").mkdir()
    from conftest import write_model_file

    arrays = {f"transformer_blocks.{i}.{n}.weight": (rng.standard_t(4, size=(256, 256)) * 0.02).astype(np.float32)
              for i in range(4) for n in ("attn.to_q", "attn.to_out.0", "ff.net.0.proj", "ff.net.2")}
    arrays["transformer_blocks.0.norm1.weight"] = np.ones(256, np.float32)
    arrays["pos_embed.proj.weight"] = (rng.standard_normal((256, 3, 2, 2)) * 0.1).astype(np.float32)
    write_model_file(root / "model" / "model.safetensors", arrays)
    r = aq.ArrowQuantV2().quantize_diffusion_model(root / "model", root / "q", aq.DiffusionQuantConfig.from_profile(
        "edge", min_tensor_size=0), report=True)
    return root, r


def test_a_data_free_report_holds_the_result_s_numbers(data_free):
    root, r = data_free
    assert r["report_path"] == str(root / "q") + ".report.html" and os.path.exists(r["report_path"])
    assert sorted(os.listdir(root)) == ["model", "q", "q.report.html"]  # beside the output, not in it
    page = _page(r["report_path"])
    _self_contained(page)
    assert _images(page) == ["fig-error", "fig-bits"]  # no calibration: no heatmap, no activation ranges
    summary = re.search(r"<table class='kv' id='summary'>(.*?)</table>", page, re.S).group(1)
    assert f"{r['compression_ratio']:.3f}x" in summary
    assert f"{r['bits_per_weight']:.3f}" in summary
    assert f"worst {r['min_cosine_similarity']:.5f} ({r['worst_layer']})" in summary
    assert f"{r['quantization_time_s']:.1f} s" in page
    d = _data(page)
    assert d["summary"]["bits_per_weight"] == r["bits_per_weight"] and d["calibrated"] is False
    assert d["layer_count"] == len(r["layers"])
    # the model's total bits in the "where the bits went" table is the result's bits per weight
    assert f"<th class='num'>{r['bits_per_weight']:.3f}</th>" in page
    # every quantized layer is in the worst-layers table when there are few of them, ranked by error
    rows = re.findall(r"<tr><td>(transformer_blocks[^<]+|pos_embed[^<]+)</td><td>([^<]+)</td><td class='num'>([^<]+)</td>",
                      page)
    errs = [float(e) for _, _, e in rows]
    assert errs == sorted(errs, reverse=True) and len(rows) == min(15, r["quantized_layers"])
    worst = max((l for l in r["layers"] if l["quantized"]), key=lambda l: l["relative_error"])
    assert rows[0][0] == worst["name"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    torch = pytest.importorskip("torch")
    import test_calibrated_quantize as t

    root = tmp_path_factory.mktemp("calibrated")
    torch.manual_seed(1)
    model = t.TinyDenoiser()
    src = root / "model"
    t._save_model(model, src)
    x = t._inputs(64, 96, 2)
    x[:, 5] *= 60
    t._record_two_passes(model, src, x, list(range(t.T_MAX - 1, -1, -25)), 0.1, num_bins=4, input_samples=128)
    r = aq.ArrowQuantV2().quantize_diffusion_model(src, root / "q", aq.DiffusionQuantConfig(
        bit_width=4, group_size=32, activation_bits=8, num_time_groups=3, min_tensor_size=0, sensitive_patterns=[]))
    return root, r


def test_a_calibrated_report_shows_groups_and_activations(calibrated, tmp_path):
    root, r = calibrated
    out = aq.report(root / "q", tmp_path / "r.html", against=root / "model", figures_dir=tmp_path / "figs")
    page = _page(out)
    _self_contained(page)
    assert _images(page) == ["fig-error", "fig-heatmap", "fig-bits", "fig-activations"]
    assert sorted(os.listdir(tmp_path / "figs")) == ["activations.png", "bits.png", "error.png", "heatmap.png"]
    # the worst (layer, group) cell named is the result's largest output error
    cells = [(l["name"], g["group"], g["relative_error"]) for l in r["layers"] if l.get("output_error")
             for g in l["output_error"]]
    name, group, err = max(cells, key=lambda c: c[2])
    first = re.search(r"<table id='worst-cells'>.*?<tr><td>1</td><td>([^<]+)</td><td>(\d+):[^<]*</td>"
                      r"<td class='num'>([^<]+)</td>", page, re.S)
    assert first and first.group(1) == name and int(first.group(2)) == group and float(first.group(3)) == float(f"{err:.4g}")
    # validated against the source: passed, and every recomputed metric equals the recorded one
    assert "<span class='ok'>passed</span>" in page and "equal the recorded ones" in page
    d = _data(page)
    assert d["calibrated"] and len(d["time_groups"]) == 3 and d["validation"]["mismatched"] == []
    assert len(d["activation_static"]) == r["quantized_layers"]
    assert d["activation_layers"] == sorted(d["activation_static"])
    assert d["activation_rows"] == 3 * r["quantized_layers"]  # one row per layer and timestep group
    assert bits_views(collect(str(root / "q")))["model"] == pytest.approx(r["bits_per_weight"])


def test_the_command_writes_the_report(calibrated, tmp_path, capsys):
    root, _ = calibrated
    assert cli.main(["report", str(root / "q"), "-o", str(tmp_path / "c.html"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["report_path"] == str(tmp_path / "c.html")
    assert cli.main(["quantize", str(root / "model"), str(tmp_path / "q2"), "--bits", "4", "--report", "--quiet"]) == 0
    assert os.path.exists(str(tmp_path / "q2") + ".report.html")
    with pytest.raises(aq.ModelNotFoundError, match="no manifest.json"):
        aq.report(tmp_path)


def test_chromium_renders_the_report_without_console_errors(calibrated, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (scripts/test.sh installs Debian's chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    root, _ = calibrated
    page = aq.report(root / "q", tmp_path / "r.html")
    shot = tmp_path / "shot.png"
    p = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", "--window-size=1280,3200",
                        f"file://{page}"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    console = [l for l in p.stderr.splitlines() if "CONSOLE" in l]
    assert console == [], console
    assert "Failed to load resource" not in p.stderr
    import matplotlib.image as mpimg

    img = mpimg.imread(str(shot))
    assert img.shape[0] >= 3000 and img.shape[1] >= 1200
    # the plots are drawn: far from a blank page (coloured pixels in the figures' area)
    rgb = img[..., :3]
    colourful = (rgb.max(axis=2) - rgb.min(axis=2)) > 0.2
    assert colourful.mean() > 0.01, colourful.mean()
