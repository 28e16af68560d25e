"""arrow_quant_v2.calibration: recording per-timestep-bin layer input statistics from a torch model.

Every model is a tiny torch module built here. The recorded statistics are checked against values
computed independently from the layer inputs captured with the test's own hooks, and the conv
unfolding is checked by reproducing each convolution's output from ``X @ W_flat^T``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from arrow_quant_v2 import ConfigurationError, ModelFormatError, QuantizationError  # noqa: E402
from arrow_quant_v2 import calibration as cal  # noqa: E402
from arrow_quant_v2.calibration import CalibrationRecorder, load_calibration, record_pipeline  # noqa: E402

SCHEMA = [
    ("component", pa.string()), ("layer", pa.string()), ("bin", pa.int32()), ("step_lo", pa.float64()),
    ("step_hi", pa.float64()), ("split", pa.string()), ("samples", pa.int64()), ("rows", pa.int64()),
    ("step_sum", pa.float64()), ("in_features", pa.int32()), ("absmax", pa.list_(pa.float32())),
    ("min", pa.list_(pa.float32())), ("max", pa.list_(pa.float32())), ("hessian", pa.list_(pa.float32())),
    ("hessian_reason", pa.string()), ("hessian_span", pa.int32()), ("hessian_rows", pa.int64()),
    ("hessian_from", pa.string()), ("hessian_block", pa.int32()), ("hist_pos", pa.list_(pa.int64())), ("hist_neg", pa.list_(pa.int64())),
    ("hist_zero", pa.int64()),
    ("inputs", pa.list_(pa.float32())),
]
HIST_META = {"arrowquant.hist_bins_per_octave": "8", "arrowquant.hist_min_exp": "-24",
             "arrowquant.hist_max_exp": "24"}


class Denoiser(nn.Module):
    """A toy denoiser with every supported layer kind: forward(x, t) like a diffusion model."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 5)
        self.block = nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=2, padding=1),                                   # plain, strided
            nn.Conv2d(4, 4, 2, padding="same", padding_mode="reflect", dilation=2),   # asymmetric 'same'
            nn.Conv2d(4, 6, 3, groups=2, padding=1, bias=False),                      # grouped
        )
        self.seq = nn.Conv1d(5, 3, 3, stride=2, padding=2, dilation=2)
        self.vol = nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2))

    def forward(self, x, t, img=None, seq=None, vol=None):
        h = self.proj(x) * (1.0 + torch.as_tensor(t, dtype=x.dtype).mean() / 1000)
        out = [h]
        if img is not None:
            out.append(self.block(img))
        if seq is not None:
            out.append(self.seq(seq))
        if vol is not None:
            out.append(self.vol(vol))
        return out


def make_inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, 3, 6, generator=g), img=torch.randn(batch, 3, 9, 8, generator=g),
                seq=torch.randn(batch, 5, 11, generator=g), vol=torch.randn(batch, 2, 4, 7, 6, generator=g))


def capture_inputs(model: nn.Module) -> Dict[str, List[torch.Tensor]]:
    """The test's own record of every Linear / Conv input, keyed by weight name."""
    seen: Dict[str, List[torch.Tensor]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, key=f"{name}.weight": seen.setdefault(key, []).append(args[0].detach().clone())))
    seen["_handles"] = handles  # type: ignore[assignment]
    return seen


def release(seen) -> None:
    for h in seen.pop("_handles"):
        h.remove()


def weight_columns(module: nn.Module) -> np.ndarray:
    return module.weight.detach().reshape(module.weight.shape[0], -1).double().numpy()


def x_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """X of one input, computed in the test: Linear by reshape; plain zero-padded Conv2d with the
    test's own F.unfold; other convs by the module under test (proved by test_conv_unfold_reproduces_output)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features)
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" \
            and not isinstance(module.padding, str):
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    kind = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}[type(module)]
    return cal._conv_patches(module, x, kind)


# ---------------------------------------------------------------------------------------------
# unfolding
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 4, 3, stride=2, padding=1),
    nn.Conv2d(4, 5, (2, 3), stride=(2, 1), padding=(0, 2), dilation=(1, 2)),
    nn.Conv2d(4, 4, 2, padding="same", padding_mode="reflect", dilation=2),
    nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular"),
    nn.Conv2d(4, 6, 3, groups=2, padding=1),
    nn.Conv2d(4, 4, 3, groups=4, padding=1, stride=2),  # depthwise
    nn.Conv1d(5, 3, 3, stride=2, padding=2, dilation=2),
    nn.Conv1d(4, 4, 4, padding="same", padding_mode="replicate", groups=2),
    nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2)),
    nn.Conv3d(4, 2, 2, groups=2, padding=1, padding_mode="reflect"),
], ids=lambda c: repr(c))
def test_conv_unfold_reproduces_output(conv):
    """X @ W_flat^T + b equals the convolution's output: the columns of X match the weight flattened
    as [out, in/groups * prod(kernel)] (grouped convolutions: groups stacked as rows)."""
    torch.manual_seed(0)
    spatial = {nn.Conv1d: (13,), nn.Conv2d: (9, 10), nn.Conv3d: (5, 6, 7)}[type(conv)]
    x = torch.randn(2, conv.in_channels, *spatial, dtype=torch.float64)
    conv = conv.double()
    kind = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}[type(conv)]
    X = cal._conv_patches(conv, x, kind)
    out = conv(x)
    g, o = conv.groups, conv.out_channels
    og = o // g
    assert X.shape[1] == conv.weight[0].numel()
    rows_per_group = X.shape[0] // g
    assert rows_per_group == out.shape[0] * math.prod(out.shape[2:])
    W = conv.weight.reshape(o, -1)
    for gi in range(g):
        Xg = X[gi * rows_per_group:(gi + 1) * rows_per_group]
        pred = Xg @ W[gi * og:(gi + 1) * og].T
        if conv.bias is not None:
            pred = pred + conv.bias[gi * og:(gi + 1) * og]
        ref = out[:, gi * og:(gi + 1) * og].flatten(2).transpose(1, 2).reshape(-1, og)
        torch.testing.assert_close(pred, ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------

def test_statistics_match_independent_computation(tmp_path):
    model = Denoiser()
    seen = capture_inputs(model)
    steps = [10.0, 420.0, 980.0, 55.0]
    with CalibrationRecorder(model, num_bins=10, holdout_every=0) as rec:
        for i, t in enumerate(steps):
            with rec.step(t):
                model(t=t, **make_inputs(seed=i))
        path = rec.save(tmp_path / "calibration.parquet")
    release(seen)
    data = load_calibration(path)
    modules = dict(model.named_modules())
    bins = [int(t // 100) for t in steps]
    assert set(data.layers) == {"proj.weight", "block.0.weight", "block.1.weight", "block.2.weight",
                                "seq.weight", "vol.weight"}
    for layer, inputs in seen.items():
        module = modules[layer[:-len(".weight")]]
        for b in sorted(set(bins)):
            xs = [x_rows(module, inputs[i]).double() for i in range(len(steps)) if bins[i] == b]
            X = torch.cat(xs).numpy()
            e = data[(layer, b, "fit")]
            assert e["rows"] == X.shape[0] and e["samples"] == len(xs)
            assert e["in_features"] == X.shape[1] == module.weight[0].numel()
            np.testing.assert_array_equal(e["absmax"], np.abs(X).max(0).astype(np.float32))
            np.testing.assert_array_equal(e["min"], X.min(0).astype(np.float32))
            np.testing.assert_array_equal(e["max"], X.max(0).astype(np.float32))
            assert math.isclose(e["step_sum"], sum(t for t, bb in zip(steps, bins) if bb == b))
            if getattr(module, "groups", 1) > 1:
                assert e["hessian"] is None and "grouped convolution (groups=2)" in e["hessian_reason"]
            else:
                assert e["hessian_reason"] is None
                # float32 products summed in float64, stored as float32
                ref = X.T @ X
                np.testing.assert_allclose(e["hessian"], ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    # bin 0 holds two calls (t=10 and t=55)
    assert data[("proj.weight", 0, "fit")]["samples"] == 2
    assert data[("proj.weight", 0, "fit")]["mean_step"] == pytest.approx(32.5)


def test_conv_hessian_reproduces_output_energy():
    """W_flat H W_flat^T equals Y^T Y of the conv output without bias: the Hessian's columns are the
    weight's columns."""
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False).double()
    x = torch.randn(2, 3, 8, 7, dtype=torch.float64)
    with CalibrationRecorder(conv, step_range=(0, 1), num_bins=1, holdout_every=0) as rec:
        with rec.step(0.5):
            y = conv(x)
    H = rec.hessian("weight", 0)
    W = conv.weight.reshape(4, -1)
    Y = y.flatten(2).transpose(1, 2).reshape(-1, 4)
    torch.testing.assert_close(W @ H @ W.T, Y.T @ Y, rtol=1e-10, atol=1e-10)


def test_layer_called_twice_in_one_call_counts_one_sample():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU())
    model.forward = lambda x: lin(lin(x))  # type: ignore[assignment]
    with CalibrationRecorder(model, holdout_every=0) as rec:
        with rec.step(5):
            model(torch.randn(3, 4))
    st = rec._stats[("0.weight", 0, "fit")]
    assert st.samples == 1 and st.rows == 6


def test_hessian_size_limit_gives_null_with_reason(tmp_path):
    model = nn.Sequential(nn.Linear(8, 3), nn.Linear(3, 2))
    with CalibrationRecorder(model, max_hessian_features=5, holdout_every=0) as rec:
        with rec.step(1):
            model(torch.randn(2, 8))
        rec.save(tmp_path / "c.parquet")
    data = load_calibration(tmp_path / "c.parquet")
    big, small = data[("0.weight", 0, "fit")], data[("1.weight", 0, "fit")]
    assert big["hessian"] is None and big["hessian_reason"] == "in_features 8 > max_hessian_features 5"
    assert big["absmax"].shape == (8,)
    assert small["hessian"].shape == (3, 3) and small["hessian_reason"] is None
    assert rec.hessian_reasons == {"0.weight": "in_features 8 > max_hessian_features 5"}


def test_cfg_doubled_batch_records_every_row():
    model = Denoiser()
    rows = []
    for batch in (1, 2):
        with CalibrationRecorder(model, holdout_every=0) as rec:
            rec.attach_timestep()
            x = torch.randn(batch, 3, 6)
            model(torch.cat([x, x]), torch.tensor([500.0] * 2 * batch))  # uncond + cond halves
        rows.append(rec._stats[("proj.weight", 5, "fit")].rows)
    assert rows == [2 * 3, 4 * 3]


# ---------------------------------------------------------------------------------------------
# bins, splits, sampling
# ---------------------------------------------------------------------------------------------

def test_bin_rule():
    r = (0.0, 1000.0)
    assert [cal.step_bin(t, r, 10) for t in (0, 99.999, 100, 550, 999.9, 1000)] == [0, 0, 1, 5, 9, 9]
    assert cal.step_bin(-3, r, 10) == 0 and cal.step_bin(5000, r, 10) == 9
    assert cal.step_bin(0.25, (0, 1), 4) == 1
    assert cal.bin_edges(3, r, 10) == (300.0, 400.0)
    assert cal.bin_edges(9, r, 10)[1] == 1000.0


def test_bins_and_edges_in_file(tmp_path):
    model = nn.Linear(3, 2)
    with CalibrationRecorder(model, step_range=(100, 300), num_bins=4, holdout_every=0) as rec:
        for t in (100, 149.9, 150, 299, 300, torch.tensor([200.0, 260.0])):
            with rec.step(t):
                model(torch.randn(1, 3))
        rec.save(tmp_path / "c.parquet")
    data = load_calibration(tmp_path / "c.parquet")
    got = {b: (e["samples"], e["step_lo"], e["step_hi"], e["step_sum"]) for (_, b, _), e in data.items()}
    assert got == {0: (2, 100.0, 150.0, 249.9), 1: (1, 150.0, 200.0, 150.0),
                   2: (1, 200.0, 250.0, 230.0), 3: (2, 250.0, 300.0, 599.0)}


def test_out_of_range_step_warns_and_clamps():
    model = nn.Linear(3, 2)
    with CalibrationRecorder(model, num_bins=10, holdout_every=0) as rec:
        with pytest.warns(UserWarning, match="outside step_range"):
            with rec.step(1500):
                model(torch.randn(1, 3))
    assert list(rec._stats) == [("weight", 9, "fit")]


def test_holdout_every_nth_recorded_call():
    model = nn.Linear(3, 2)
    with CalibrationRecorder(model, num_bins=1, holdout_every=3) as rec:
        for _ in range(7):
            with rec.step(1):
                model(torch.randn(2, 3))
    assert rec._stats[("weight", 0, "fit")].samples == 5      # calls 0, 1, 3, 4, 6
    assert rec._stats[("weight", 0, "holdout")].samples == 2  # calls 2, 5
    with CalibrationRecorder(model, num_bins=1, holdout_every=0) as rec:
        for _ in range(4):
            with rec.step(1):
                model(torch.randn(2, 3))
    assert list(rec._stats) == [("weight", 0, "fit")]


def test_holdout_is_stratified_by_bin():
    """Two runs of 4 steps through bins 3, 2, 1, 0 with holdout_every=2: one of each bin's two
    calls is held out, so both splits hold every bin (counting over all calls would hold out bins 2
    and 0 only)."""
    model = nn.Linear(3, 2)
    with CalibrationRecorder(model, num_bins=4, holdout_every=2) as rec:
        for _ in range(2):
            for t in (900, 600, 300, 10):
                with rec.step(t):
                    model(torch.randn(2, 3))
    assert sorted(rec._stats) == [("weight", b, s) for b in range(4) for s in ("fit", "holdout")]
    assert all(st.samples == 1 for st in rec._stats.values())


def test_sampling_with_total_calls_is_evenly_spaced():
    assert cal.sample_indices(20, 5) == [0, 5, 10, 14, 19]
    assert cal.sample_indices(50, 8) == [0, 7, 14, 21, 28, 35, 42, 49]
    assert cal.sample_indices(3, 10) == [0, 1, 2]
    assert cal.sample_indices(7, 1) == [0]
    for total, n in ((1000, 128), (129, 128), (37, 36)):
        idx = cal.sample_indices(total, n)
        assert len(idx) == n and idx[0] == 0 and idx[-1] == total - 1
        expect = np.floor(np.linspace(0, total - 1, n) + 0.5).astype(int)
        assert idx == expect.tolist()
    model = nn.Linear(3, 2)
    with CalibrationRecorder(model, step_range=(0, 20), num_bins=20, max_samples=5, total_calls=20,
                             holdout_every=0) as rec:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for i in range(20):
                with rec.step(i):
                    model(torch.randn(1, 3))
        assert sorted(b for _, b, _ in rec._stats) == [0, 5, 10, 14, 19]
        assert rec.calls == 20 and rec.recorded_calls == 5
        # more calls than announced: warned once, not recorded
        with pytest.warns(UserWarning, match="beyond total_calls=20") as w:
            for i in range(2):
                with rec.step(1):
                    model(torch.randn(1, 3))
        assert sum("beyond total_calls" in str(x.message) for x in w) == 1
    assert rec.recorded_calls == 5


def test_sampling_without_total_calls_records_first_n_and_warns_once():
    model = nn.Linear(3, 2)
    with CalibrationRecorder(model, step_range=(0, 10), num_bins=10, max_samples=3, holdout_every=0) as rec:
        with pytest.warns(UserWarning, match="total_calls") as w:
            for i in range(6):
                with rec.step(i):
                    model(torch.randn(1, 3))
    assert sum("max_samples=3" in str(x.message) for x in w) == 1
    assert sorted(b for _, b, _ in rec._stats) == [0, 1, 2]
    assert rec.calls == 6 and rec.recorded_calls == 3


def test_calls_outside_step_are_not_recorded():
    model = nn.Linear(3, 2)
    with CalibrationRecorder(model) as rec:
        with pytest.warns(UserWarning, match="outside rec.step"):
            model(torch.randn(1, 3))
    assert rec.calls == 0 and not rec._stats


def test_nested_step_is_an_error():
    with CalibrationRecorder(nn.Linear(2, 2)) as rec:
        with rec.step(1):
            with pytest.raises(ConfigurationError, match="cannot be nested"):
                with rec.step(2):
                    pass


def test_mask_ratio_loop():
    """A masked diffusion LM: with rec.step(mask_ratio): logits = model(tokens)."""
    model = nn.Sequential(nn.Embedding(11, 4), nn.Linear(4, 11))
    with CalibrationRecorder(model, step_kind="mask_ratio", num_bins=4, holdout_every=0) as rec:
        assert rec.step_range == (0.0, 1.0)
        for ratio in (0.1, 0.6, 0.65, 1.0):
            with rec.step(ratio):
                model(torch.randint(0, 11, (2, 5)))
    assert rec.layers == ["1.weight"]  # Embedding is not recorded
    assert {b: st.samples for (_, b, _), st in rec._stats.items()} == {0: 1, 2: 2, 3: 1}
    assert rec.metadata()["arrowquant.step_kind"] == "mask_ratio"


# ---------------------------------------------------------------------------------------------
# attach_timestep
# ---------------------------------------------------------------------------------------------

def test_attach_timestep_keyword_and_positional():
    model = Denoiser()
    with CalibrationRecorder(model, holdout_every=0) as rec:
        rec.attach_timestep()
        x = torch.randn(2, 3, 6)
        model(x, t=torch.tensor([310.0, 330.0]))      # keyword 't', 1-d: mean 320
        model(x, torch.tensor(730))                  # 2nd positional, 0-d
        model(x=x, t=950.0)                          # plain float keyword
    assert rec.calls == 3
    got = {b: (st.samples, st.step_sum) for (name, b, _), st in rec._stats.items() if name == "proj.weight"}
    assert got == {3: (1, 320.0), 7: (1, 730.0), 9: (1, 950.0)}


def test_attach_timestep_diffusers_style_kwarg_and_scale():
    class Unet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, sample, timestep, encoder_hidden_states=None):
            return self.lin(sample)

    unet = Unet()
    with CalibrationRecorder(unet, holdout_every=0) as rec:
        rec.attach_timestep(scale=1000)
        unet(sample=torch.randn(1, 4), timestep=torch.tensor([0.25]), encoder_hidden_states=None)
    assert list(rec._stats) == [("lin.weight", 2, "fit")]
    with CalibrationRecorder(unet, holdout_every=0) as rec:
        rec.attach_timestep(arg="encoder_hidden_states")
        unet(torch.randn(1, 4), 5, encoder_hidden_states=torch.tensor(880.0))
    assert list(rec._stats) == [("lin.weight", 8, "fit")]


def test_attach_timestep_missing_argument_is_a_clear_error():
    model = nn.Linear(3, 2)
    with CalibrationRecorder(model) as rec:
        rec.attach_timestep()
        with pytest.raises(ConfigurationError, match="cannot find the timestep of a call of Linear"):
            model(torch.randn(1, 3))
        assert rec._active is None  # the failed call left no call open


def test_attach_timestep_inside_step_is_one_call():
    model = Denoiser()
    with CalibrationRecorder(model, holdout_every=0) as rec:
        rec.attach_timestep()
        with rec.step(150):
            model(torch.randn(1, 3, 6), 999)
            model(torch.randn(1, 3, 6), 999)
    assert rec.calls == 1
    st = rec._stats[("proj.weight", 1, "fit")]
    assert st.samples == 1 and st.rows == 6


# ---------------------------------------------------------------------------------------------
# the model is not changed
# ---------------------------------------------------------------------------------------------

def test_outputs_unchanged_and_close_removes_hooks():
    torch.manual_seed(3)
    model = Denoiser()
    inputs = make_inputs(seed=7)
    before = model(t=123.0, **inputs)
    rec = CalibrationRecorder(model)
    rec.attach_timestep()
    assert any(m._forward_pre_hooks for m in model.modules())
    during = model(t=123.0, **inputs)
    for a, b in zip(before, during):
        assert torch.equal(a, b)
    assert rec.recorded_calls == 1
    rec.close()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(t=123.0, **inputs)  # no hook left: nothing counted, nothing warned
    assert rec.calls == 1
    with pytest.raises(ConfigurationError, match="closed"):
        with rec.step(1):
            pass


def test_grad_and_inference_modes():
    model = nn.Linear(3, 2)
    with CalibrationRecorder(model, num_bins=1, holdout_every=0) as rec:
        with torch.inference_mode(), rec.step(1):
            model(torch.randn(2, 3))
        with rec.step(1):  # grad enabled: the output still has a graph, the statistics none
            y = model(torch.randn(2, 3, requires_grad=True))
        y.sum().backward()
        with torch.inference_mode(), rec.step(1):
            model(torch.randn(2, 3))
    st = rec._stats[("weight", 0, "fit")]
    assert st.samples == 3 and st.rows == 6
    h = rec.hessian("weight", 0)
    assert not h.requires_grad and not h.is_inference()


def test_half_precision_inputs_accumulate_in_float64():
    """float32 products of at most HESSIAN_CHUNK_ROWS rows summed in float64: bfloat16 inputs' products
    are exact in float32, so only the float32 sums of a chunk round."""
    model = nn.Linear(4, 3).to(torch.bfloat16)
    x = torch.randn(5, 4).to(torch.bfloat16)
    with CalibrationRecorder(model, device="cpu", holdout_every=0) as rec:
        with rec.step(0):
            model(x)
    st = rec._stats[("weight", 0, "fit")]
    h = rec.hessian("weight", 0)
    xd = x.double()
    assert h.dtype == torch.float64 and st.absmax.dtype == torch.float32
    torch.testing.assert_close(h, xd.T @ xd, rtol=1e-6, atol=1e-6)
    assert torch.equal(st.absmax, x.float().abs().amax(0))


# ---------------------------------------------------------------------------------------------
# the file
# ---------------------------------------------------------------------------------------------

def test_file_schema_and_metadata(tmp_path):
    model = Denoiser()
    with CalibrationRecorder(model, num_bins=5, component="unet", holdout_every=2) as rec:
        for i, t in enumerate((10, 990, 500, 995)):  # bin 4's second call is held out
            with rec.step(t):
                model(t=t, **make_inputs(seed=i))
        path = rec.save(tmp_path / "calibration.parquet")
    assert os.listdir(tmp_path) == ["calibration.parquet"]  # no temporary file left
    schema = pq.read_schema(path)
    assert [(f.name, f.type) for f in schema] == SCHEMA
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert meta["arrowquant.calibration_version"] == "2"
    assert meta["arrowquant.step_kind"] == "timestep"
    assert json.loads(meta["arrowquant.step_range"]) == [0, 1000]
    assert meta["arrowquant.num_bins"] == "5"
    assert meta["arrowquant.samples"] == "4"
    for k, v in HIST_META.items():
        assert meta[k] == v
    pf = pq.ParquetFile(path)
    table = pf.read()
    assert pf.num_row_groups == table.num_rows == 6 * 4  # 6 layers x (bins 0, 2, 4 fit, bin 4 holdout)
    assert set(table.column("component").to_pylist()) == {"unet"}
    assert table.column("layer").to_pylist()[:4] == ["proj.weight"] * 4  # model order, then bin, then split
    assert table.column("bin").to_pylist()[:4] == [0, 2, 4, 4]
    assert table.column("split").to_pylist()[:4] == ["fit", "fit", "fit", "holdout"]
    # every layer name is a weight tensor name of the model's state_dict
    assert set(table.column("layer").to_pylist()) <= set(model.state_dict())
    for row in table.to_pylist():
        f = row["in_features"]
        assert len(row["absmax"]) == f
        assert (row["hessian"] is None) == (row["hessian_reason"] is not None)  # one Hessian per bin here
        assert row["hessian_span"] == 1
        if row["hessian"] is not None:
            assert len(row["hessian"]) == f * (f + 1) // 2  # the upper triangle
            assert row["hessian_rows"] == row["rows"]
        assert len(row["hist_pos"]) == len(row["hist_neg"]) == 384 and row["hist_zero"] >= 0
    assert all(not schema.field(n).nullable for n in ("hist_pos", "hist_neg", "hist_zero"))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not the private mode of a temporary file


# ---------------------------------------------------------------------------------------------
# the histogram of input values
# ---------------------------------------------------------------------------------------------

def np_hist(values) -> Dict[str, object]:
    """The histogram computed independently with numpy: bin floor(log2|x| * 8) + 192 clamped to
    [0, 383] (float64 log2 of the float32 values), exact zeros alone, NaN nowhere."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    out: Dict[str, object] = {"hist_zero": int((x == 0).sum())}
    for col, mag in (("hist_pos", x[x > 0]), ("hist_neg", -x[x < 0])):
        with np.errstate(divide="ignore"):
            k = np.clip(np.floor(np.log2(mag) * 8) + 192, 0, 383).astype(np.int64)
        out[col] = np.bincount(k, minlength=384)
    return out


def edge_values(seed: int) -> torch.Tensor:
    """Values on and one float32 ulp either side of bin edges 2^(j/8), exact zeros of both signs,
    values far outside [2^-24, 2^24] (subnormal included), of both signs, plus normal noise."""
    rng = np.random.default_rng(seed)
    j = rng.integers(-200, 200, 40)
    e = np.exp2(j / 8).astype(np.float32)
    near = np.concatenate([e, np.nextafter(e, np.float32(0)), np.nextafter(e, np.float32(np.inf)),
                           np.float32([2.0 ** -24, 2.0 ** 24, 1e-30, 1e-45, 3e30, 0.0, -0.0, 0.0])])
    sign = np.where(rng.random(near.size) < 0.5, -1, 1).astype(np.float32)
    v = np.concatenate([near * sign, rng.standard_normal(400).astype(np.float32)])
    return torch.from_numpy(rng.permutation(v).astype(np.float32))


class HistModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 3)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)  # padding adds zeros to X, not to the histogram

    def forward(self, x, img):
        return self.lin(x), self.conv(img)


def test_histogram_matches_numpy_linear_and_conv2d(tmp_path):
    """Per (layer, bin, split): hist_pos / hist_neg / hist_zero over every element of the layer's raw
    inputs equal numpy's; their total is the number of input elements (a conv's raw input, not its
    unfolded X); fit and holdout are kept apart."""
    model = HistModel()
    seen = capture_inputs(model)
    steps = [110.0, 120.0, 130.0, 640.0]  # calls 0, 2: bin 1 holdout; 1: bin 1 fit; 3: bin 6 fit
    with CalibrationRecorder(model, num_bins=10, holdout_every=2,
                             max_hessian_features=0) as rec:  # 3e30 squared is beyond a stored float32
        for i, t in enumerate(steps):
            v = edge_values(i)
            x = v[:64 * 8].reshape(4, 16, 8)
            img = v[-2 * 2 * 9 * 10:].reshape(2, 2, 9, 10).clone()
            x[1, 2, 3:5] = torch.tensor([0.0, -0.0])
            img[1, 0, 2, 3:5] = torch.tensor([-0.0, 0.0])
            with rec.step(t):
                model(x, img)
        path = rec.save(tmp_path / "calibration.parquet")
    release(seen)
    data = load_calibration(path)
    groups = {(1, "holdout"): [0, 2], (1, "fit"): [1], (6, "fit"): [3]}
    assert set(data) == {(layer, b, sp) for layer in ("lin.weight", "conv.weight") for b, sp in groups}
    for layer, inputs in seen.items():
        for (b, split), calls in groups.items():
            e = data[(layer, b, split)]
            values = np.concatenate([inputs[i].numpy().reshape(-1) for i in calls])
            want = np_hist(values)
            for col in ("hist_pos", "hist_neg"):
                assert e[col].dtype == np.int64 and e[col].shape == (384,)
                np.testing.assert_array_equal(e[col], want[col], err_msg=f"{layer} {b} {split} {col}")
            assert e["hist_zero"] == want["hist_zero"] >= 2 * len(calls)
            total = int(e["hist_pos"].sum() + e["hist_neg"].sum() + e["hist_zero"])
            assert total == values.size == sum(inputs[i].numel() for i in calls)
            if layer == "lin.weight":
                assert total == e["rows"] * e["in_features"]
            else:
                assert total < e["rows"] * e["in_features"]  # X repeats elements and adds padding
    # the edge values spread over the whole range: first and last bins used, both signs
    e = data[("lin.weight", 1, "holdout")]  # calls 0 and 2
    assert e["hist_pos"][0] > 0 and e["hist_pos"][383] > 0 and e["hist_neg"][0] > 0 and e["hist_neg"][383] > 0


def test_histogram_zeros_non_finite_and_dtypes():
    """+0.0 and -0.0 count in hist_zero only; the smallest subnormal in the first bin; +-inf in the last
    bin of their sign; NaN nowhere. float16 / bfloat16 inputs are binned as their float32 values,
    float64 inputs exactly in float64."""
    lin = nn.Linear(5, 2)
    x = torch.tensor([[0.0, -0.0, 1e-45, float("inf"), float("-inf")],
                      [float("nan"), 1.0, -1.0, 3.0, -0.75]])
    with CalibrationRecorder(lin, num_bins=1, holdout_every=0) as rec:
        with rec.step(0):
            lin(x)
    h = rec._stats[("weight", 0, "fit")].hist.numpy()
    pos, neg, zero = h[:384], h[384:768], int(h[768])
    assert zero == 2
    # bins: 1e-45 -> 0, 1 -> 192, 3 -> 192 + floor(12.7) = 204, inf -> 383; 0.75 -> 192 + floor(-3.3) = 188
    assert {int(k): int(pos[k]) for k in np.flatnonzero(pos)} == {0: 1, 192: 1, 204: 1, 383: 1}
    assert {int(k): int(neg[k]) for k in np.flatnonzero(neg)} == {188: 1, 192: 1, 383: 1}
    assert pos.sum() + neg.sum() + zero == x.numel() - 1  # the NaN

    for dtype in (torch.float16, torch.bfloat16):
        lin = nn.Linear(6, 2).to(dtype)
        xh = torch.randn(7, 6).to(dtype)
        xh[0, :3] = 0
        with CalibrationRecorder(lin, num_bins=1, holdout_every=0) as rec:
            with rec.step(0):
                lin(xh)
        h = rec._stats[("weight", 0, "fit")].hist.numpy()
        want = np_hist(xh.float().numpy())
        np.testing.assert_array_equal(h[:384], want["hist_pos"])
        np.testing.assert_array_equal(h[384:768], want["hist_neg"])
        assert h[768] == want["hist_zero"] >= 3

    # float64 values one ulp either side of an edge 2^(j/8), and one below float32's smallest subnormal
    from fractions import Fraction
    vals = []
    for j in range(-191, 197, 3):
        e = 2.0 ** (j / 8)
        vals += [np.nextafter(e, 0.0), e, np.nextafter(e, np.inf)]
    vals.append(1e-300)
    conv = nn.Conv1d(1, 1, 1).double()
    with CalibrationRecorder(conv, num_bins=1, holdout_every=0) as rec:
        with rec.step(0):
            conv(torch.tensor(vals, dtype=torch.float64).reshape(1, 1, -1))
    h = rec._stats[("weight", 0, "fit")].hist.numpy()

    def exact_bin(v):  # 192 + the largest j with v^8 >= 2^j, clamped
        j = int(math.floor(math.log2(v) * 8)) + 2
        while Fraction(v) ** 8 < Fraction(2) ** j:
            j -= 1
        return min(383, max(0, j + 192))

    assert np.bincount([exact_bin(v) for v in vals], minlength=384).tolist() == h[:384].tolist()
    assert h[0] == 2  # 1e-300 (positive in float64, not a zero) and the value one ulp below 2^(-191/8)
    assert h[1] == 2 and h[383] == 6  # 2^(193/8), 2^(196/8) and their neighbours: beyond 2^24
    assert h[384:].sum() == 0


def test_load_calibration_histogram_columns_are_optional(tmp_path):
    model = nn.Linear(3, 2)
    with CalibrationRecorder(model, num_bins=2, holdout_every=0) as rec:
        with rec.step(100):
            model(torch.tensor([[0.0, 0.5, -2.0]]))
        path = rec.save(tmp_path / "calibration.parquet")
    e = load_calibration(path)[("weight", 0, "fit")]
    assert e["hist_zero"] == 1 and e["hist_pos"][184] == 1 and e["hist_neg"][200] == 1
    assert e["hist_pos"].sum() == e["hist_neg"].sum() == 1
    # a file written before the histogram columns: read, histograms None
    table = pq.read_table(path)
    old = table.drop_columns(["hist_pos", "hist_neg", "hist_zero"])
    old = old.replace_schema_metadata({k: v for k, v in table.schema.metadata.items()
                                       if not k.startswith(b"arrowquant.hist_")})
    pq.write_table(old, tmp_path / "old.parquet")
    e = load_calibration(tmp_path / "old.parquet")[("weight", 0, "fit")]
    assert e["hist_pos"] is None and e["hist_neg"] is None and e["hist_zero"] is None
    assert e["rows"] == 1 and e["absmax"].tolist() == [0.0, 0.5, 2.0]
    # another histogram layout, or a column missing: refused
    meta = dict(table.schema.metadata)
    meta[b"arrowquant.hist_bins_per_octave"] = b"4"
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "layout.parquet")
    with pytest.raises(ModelFormatError, match="histogram layout"):
        load_calibration(tmp_path / "layout.parquet")
    pq.write_table(table.drop_columns(["hist_zero"]), tmp_path / "partial.parquet")
    with pytest.raises(ModelFormatError, match="hist_zero"):
        load_calibration(tmp_path / "partial.parquet")


def test_save_is_atomic(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    rec = CalibrationRecorder(model)
    with rec.step(1):
        model(torch.randn(1, 3))
    rec.close()
    target = tmp_path / "calibration.parquet"
    target.write_bytes(b"old")

    def boom(self, table, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        rec.save(target)
    assert os.listdir(tmp_path) == ["calibration.parquet"] and target.read_bytes() == b"old"
    monkeypatch.undo()
    rec.save(target)  # works after close
    assert os.listdir(tmp_path) == ["calibration.parquet"]
    assert load_calibration(target)[("weight", 0, "fit")]["rows"] == 1
    with pytest.raises(FileNotFoundError):
        rec.save(tmp_path / "missing" / "calibration.parquet")


def test_non_finite_inputs_fail_at_save_naming_the_layer(tmp_path):
    model = nn.Linear(3, 2)
    with CalibrationRecorder(model, holdout_every=0) as rec:
        with rec.step(250):
            model(torch.tensor([[1.0, float("inf"), 0.0]]))
    with pytest.raises(QuantizationError, match=r"layer 'weight' \(timestep bin 2, split 'fit'\).*column 1"):
        rec.save(tmp_path / "c.parquet")
    assert os.listdir(tmp_path) == []


def test_empty_recording_saves_with_warning(tmp_path):
    rec = CalibrationRecorder(nn.Linear(2, 2))
    with pytest.warns(UserWarning, match="no call was recorded"):
        rec.save(tmp_path / "c.parquet")
    data = load_calibration(tmp_path / "c.parquet")
    assert len(data) == 0 and data.num_bins == 10 and data.step_range == (0.0, 1000.0)


def test_load_rejects_other_versions(tmp_path):
    schema = cal.calibration_schema({"arrowquant.calibration_version": "3"})
    pq.write_table(schema.empty_table(), tmp_path / "c.parquet")
    with pytest.raises(ModelFormatError, match="calibration_version is '3'"):
        load_calibration(tmp_path / "c.parquet")


# ---------------------------------------------------------------------------------------------
# record_pipeline
# ---------------------------------------------------------------------------------------------

class FakeScheduler:
    config = {"num_train_timesteps": 1000}


class FakePipeline:
    """Calls its unet like a diffusers pipeline: one call per step, CFG-doubled batch, the timestep as
    the 2nd positional argument."""

    def __init__(self):
        self.unet = Denoiser()
        self.scheduler = FakeScheduler()
        self.prompts: List[str] = []

    def __call__(self, prompt, num_inference_steps=10, guidance_scale=5.0):
        self.prompts.append(prompt)
        x = torch.randn(1, 3, 6)
        for t in torch.linspace(999, 0, num_inference_steps):
            x2 = torch.cat([x, x])
            out = self.unet(x2, t)[0]
            x = x + 0.01 * out[:1, :, :1]


def test_record_pipeline(tmp_path):
    pipe = FakePipeline()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec = record_pipeline(pipe, ["a cat", "a dog"], num_inference_steps=10, max_samples=8, num_bins=5,
                              output_path=tmp_path / "calibration.parquet")
    assert pipe.prompts == ["a cat", "a dog"]
    assert rec.total_calls == 20 and rec.calls == 20 and rec.recorded_calls == 8
    assert not any(m._forward_pre_hooks for m in pipe.unet.modules())  # returned closed
    data = load_calibration(tmp_path / "calibration.parquet")
    rows = [e for (layer, _, _), e in data.items() if layer == "proj.weight"]
    assert {e["component"] for e in rows} == {"unet"}
    assert sum(e["samples"] for e in rows) == 8
    assert sum(e["rows"] for e in rows) == 8 * 2 * 3  # CFG halves both recorded
    assert sum(e["samples"] for e in rows if e["split"] == "holdout") == 2
    assert {b for (_, b, _) in data} == {0, 1, 2, 3, 4}


def test_record_pipeline_needs_a_denoiser():
    with pytest.raises(ConfigurationError, match="no 'transformer', 'unet' or 'model'"):
        record_pipeline(object(), "x", num_inference_steps=2)


# ---------------------------------------------------------------------------------------------
# arguments and import
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(num_bins=0), "num_bins"),
    (dict(step_range=(5, 5)), "step_range"),
    (dict(step_range=(0, float("inf"))), "step_range"),
    (dict(max_samples=0), "max_samples"),
    (dict(total_calls=0), "total_calls"),
    (dict(holdout_every=1), "holdout_every"),
    (dict(max_hessian_features=-1), "max_hessian_features"),
    (dict(step_kind="sigma"), "step_kind"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        CalibrationRecorder(nn.Linear(2, 2), **kwargs)


def test_bad_step_values_and_models():
    with pytest.raises(ConfigurationError, match="no nn.Linear"):
        CalibrationRecorder(nn.ReLU())
    rec = CalibrationRecorder(nn.Linear(2, 2))
    for bad in (float("nan"), torch.zeros(2, 2), "3", True):
        with pytest.raises(ConfigurationError, match="rec.step"):
            with rec.step(bad):
                pass
    rec.close()


def test_importing_the_package_does_not_import_torch():
    code = "import sys, arrow_quant_v2; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_input_samples_are_rows_of_x_drawn_reproducibly(tmp_path):
    """input_samples: at most that many rows per (layer, bin, split), each an actual row of the
    layer's X (for a convolution, an unfolded patch), and the same rows on a rerun."""
    def record(path, samples):
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
        xs = [torch.randn(50, 6, generator=torch.Generator().manual_seed(i)) for i in range(8)]
        rec = CalibrationRecorder(model, step_range=(0, 8), num_bins=2, max_samples=8, holdout_every=0,
                                  input_samples=samples)
        with torch.no_grad():
            for i, x in enumerate(xs):
                with rec.step(i):
                    model(x)
        rec.save(path)
        return load_calibration(path), xs

    data, xs = record(tmp_path / "a.parquet", 16)
    again, _ = record(tmp_path / "b.parquet", 16)
    for b in (0, 1):
        entry = data[("0.weight", b, "fit")]
        assert entry["inputs"].shape == (16, 6)
        pool = torch.cat(xs[4 * b:4 * b + 4]).numpy()  # steps 0-3 in bin 0, 4-7 in bin 1
        for row in entry["inputs"]:
            assert np.any(np.all(pool == row, axis=1)), "a sampled row that the layer never saw"
        assert len({r.tobytes() for r in entry["inputs"]}) == 16  # distinct rows: sampled without replacement
        np.testing.assert_array_equal(entry["inputs"], again[("0.weight", b, "fit")]["inputs"])
    # few rows: every one kept
    small, _ = record(tmp_path / "c.parquet", 1000)
    assert small[("0.weight", 0, "fit")]["inputs"].shape == (200, 6)
    none, _ = record(tmp_path / "d.parquet", 0)
    assert none[("0.weight", 0, "fit")]["inputs"] is None
    with pytest.raises(ConfigurationError, match="input_samples"):
        CalibrationRecorder(nn.Linear(2, 2), input_samples=-1)


def test_input_samples_spread_over_the_whole_stream():
    """Reservoir sampling: rows late in the stream are as likely to be kept as early ones."""
    model = nn.Linear(1, 1)
    rec = CalibrationRecorder(model, step_range=(0, 1), num_bins=1, max_samples=1, holdout_every=0, input_samples=500)
    x = torch.arange(20000, dtype=torch.float32).reshape(-1, 1)
    with torch.no_grad(), rec.step(0.5):
        for chunk in x.split(1000):
            model(chunk)
    kept = rec._stats[("weight", 0, "fit")].inputs.numpy().ravel()
    assert len(kept) == 500 and len(set(kept.tolist())) == 500
    # uniform over 0..19999: mean 10000, sd of the mean of 500 draws about 260
    assert abs(kept.mean() - 10000) < 1300
    assert (kept >= 15000).sum() > 60
