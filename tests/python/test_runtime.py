"""arrow_quant_v2.runtime: quantized models run in PyTorch with their weights kept packed.

Held against the loader: every scheme decodes in the runtime to exactly what ``numpy()`` returns
(rounded to the compute dtype), each swapped layer kind computes what the same module with the
dequantized weights computes, and a whole diffusers pipeline generates the same images.
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
from arrow_quant_v2 import runtime  # noqa: E402
from arrow_quant_v2.safetensors_writer import write_safetensors  # noqa: E402

from conftest import write_model_file  # noqa: E402
from test_calibrated_quantize import TinyDenoiser, _inputs as calib_inputs, _record_two_passes, _save_model  # noqa: E402

# (config overrides) for every scheme family the format has
SCHEMES = {
    "int2_g64": dict(scheme="affine", bit_width=2, group_size=64),
    "int3_g32": dict(scheme="affine", bit_width=3, group_size=32),
    "int4_g128": dict(scheme="affine", bit_width=4, group_size=128),
    "int4_g32_sym": dict(scheme="affine", bit_width=4, group_size=32, symmetric=True),
    "int5_g64": dict(scheme="affine", bit_width=5, group_size=64),
    "int8_channel": dict(scheme="affine", bit_width=8, group_size=0),
    "int4_rotated": dict(scheme="affine", bit_width=4, group_size=64, rotate=True),
    "q8_0": dict(scheme="q8_0"), "q6_k": dict(scheme="q6_k"), "q5_k": dict(scheme="q5_k"),
    "q4_k": dict(scheme="q4_k"), "q3_k": dict(scheme="q3_k"), "q2_k": dict(scheme="q2_k"),
    "iq4_xs": dict(scheme="iq4_xs"), "iq4_nl": dict(scheme="iq4_nl"),
}


def _quantize(src, out, **cfg):
    base = dict(min_tensor_size=0, enable_fallback=False, sensitive_patterns=[])
    base.update(cfg)
    return aq.ArrowQuantV2().quantize_diffusion_model(str(src), str(out), aq.DiffusionQuantConfig(**base))


@pytest.fixture(scope="module")
def matrices(tmp_path_factory):
    rng = np.random.default_rng(7)
    d = tmp_path_factory.mktemp("rt_src")
    arrays = {"a.weight": rng.standard_normal((48, 512)).astype(np.float32),
              "b.weight": rng.standard_t(4.0, size=(33, 256)).astype(np.float32)}
    write_model_file(d / "model.safetensors", arrays)
    return d / "model.safetensors"


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_every_scheme_decodes_as_numpy(matrices, tmp_path, scheme):
    out = tmp_path / scheme
    _quantize(matrices, out, **SCHEMES[scheme])
    model = aq.load(out)
    for name in model.tensor_names():
        t = model[name]
        assert t.quantized, name
        ref = t.numpy()
        layer = t._reader.layer(t._index)
        assert layer.nbytes <= t.stored_bytes
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for threads in (1, 2, 5):
                buf = torch.full((t.shape[0] * t.shape[1],), 7.0, dtype=dtype)
                layer.decode_into(buf, threads)
                want = torch.from_numpy(ref).to(dtype).reshape(-1)
                assert torch.equal(buf.view(torch.int16) if dtype != torch.float32 else buf,
                                   want.view(torch.int16) if dtype != torch.float32 else want), (name, dtype, threads)


def test_entropy_layers_are_decoded_once_with_a_warning(matrices, tmp_path):
    out = tmp_path / "ent"
    _quantize(matrices, out, scheme="entropy", bit_width=4, target_bits_per_weight=4.0)
    m = torch.nn.Module()
    m.a = torch.nn.Linear(512, 48, bias=False)
    m.b = torch.nn.Linear(256, 33, bias=False)
    with pytest.warns(RuntimeWarning, match="entropy-coded layers are decoded once"):
        runtime.apply(m, out)
    x = torch.randn(3, 512)
    ref = aq.load(out)["a.weight"].numpy()
    assert torch.equal(m.a(x), torch.nn.functional.linear(x, torch.from_numpy(ref)))
    assert runtime.resident_bytes(m)["decoded"] == (48 * 512 + 33 * 256) * 4


def test_decode_into_rejects_wrong_buffers(matrices, tmp_path):
    _quantize(matrices, tmp_path / "q", scheme="q4_k")
    t = aq.load(tmp_path / "q")["a.weight"]
    layer = t._reader.layer(t._index)
    with pytest.raises(aq.ConfigurationError, match="holds 10 values"):
        layer.decode_into(torch.empty(10), 1)
    with pytest.raises(aq.ConfigurationError, match="float32, float16 or bfloat16"):
        layer.decode_into(torch.empty(48 * 512, dtype=torch.float64), 1)


class Layers(torch.nn.Module):
    """Every layer kind the runtime swaps, plus a norm and a kept 1-D tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(256, 64)
        self.c1 = torch.nn.Conv1d(32, 48, 8, padding=2)
        self.c2 = torch.nn.Conv2d(16, 32, 4, stride=2)
        self.c2g = torch.nn.Conv2d(32, 64, 3, groups=2, padding=1)
        self.c3 = torch.nn.Conv3d(8, 16, (2, 4, 4))
        self.norm = torch.nn.LayerNorm(64)
        self.emb = torch.nn.Embedding(300, 256)

    def forward(self, x, s1, s2, s3, ids):
        return (self.norm(self.lin(x)), self.c1(s1), self.c2g(self.c2(s2)), self.c3(s3), self.emb(ids))


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(5, 256, generator=g).to(dtype), torch.randn(2, 32, 40, generator=g).to(dtype),
            torch.randn(2, 16, 18, 18, generator=g).to(dtype), torch.randn(1, 8, 6, 12, 12, generator=g).to(dtype),
            torch.tensor([[3, 299, 3], [0, 17, 250]]))


@pytest.fixture(scope="module")
def layers_model(tmp_path_factory):
    torch.manual_seed(0)
    m = Layers()
    d = tmp_path_factory.mktemp("rt_layers")
    state = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    write_safetensors(d / "model.safetensors", [(k, "F32", tuple(v.shape)) for k, v in state.items()],
                      lambda k: state[k])
    return d / "model.safetensors"


@pytest.mark.parametrize("scheme", ["int4_g32", "q8_0", "iq4_nl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_layer_kind_computes_as_the_dequantized_module(layers_model, tmp_path, scheme, dtype):
    cfg = {"int4_g32": dict(scheme="affine", bit_width=4, group_size=32), "q8_0": dict(scheme="q8_0"),
           "iq4_nl": dict(scheme="iq4_nl")}[scheme]
    out = tmp_path / "q"
    _quantize(layers_model, out, **cfg)
    model = aq.load(out)
    swapped = [n for n in model.tensor_names() if model[n].quantized]
    assert len(swapped) >= 3 and "emb.weight" in swapped, swapped
    ref = Layers().to(dtype)
    ref.load_state_dict(model.to_torch_state_dict(dtype=dtype))
    m = Layers().to(dtype)
    runtime.apply(m, out)
    assert type(m.lin) is torch.nn.Linear and type(m.c2) is torch.nn.Conv2d  # classes kept
    with torch.no_grad():
        for got, want in zip(m(*_inputs(dtype)), ref(*_inputs(dtype))):
            assert torch.equal(got, want)
    for n in swapped:
        owner = m.get_submodule(n.rsplit(".", 1)[0])
        assert owner.weight.untyped_storage().nbytes() == owner.weight.element_size()  # no memory for the weight
        assert torch.isnan(owner.weight).all()
        assert owner.weight.dtype == dtype and tuple(owner.weight.shape) == tuple(model[n].shape)
    # state_dict gives the decoded values, ready for a dense module
    sd = m.state_dict()
    for n in swapped:
        assert torch.equal(sd[n], ref.state_dict()[n]), n


def test_memory_of_the_swapped_modules(layers_model, tmp_path):
    out = tmp_path / "q"
    _quantize(layers_model, out, scheme="affine", bit_width=4, group_size=32)
    model = aq.load(out)
    m = runtime.apply(Layers(), out)
    mem = runtime.resident_bytes(m)
    q = [model[n] for n in model.tensor_names() if model[n].quantized]
    assert mem["packed"] == sum(t.stored_bytes for t in q)
    dense = sum(int(np.prod(model[n].shape)) * 4 for n in model.tensor_names() if not model[n].quantized)
    assert mem["dense"] == dense
    assert mem["decoded"] == 0
    full = sum(p.numel() * 4 for p in Layers().parameters())
    assert mem["packed"] + mem["dense"] < 0.2 * full


def test_meta_module_and_shape_errors(layers_model, tmp_path):
    out = tmp_path / "q"
    _quantize(layers_model, out, scheme="q8_0")
    with torch.device("meta"):
        m = Layers()
    runtime.apply(m, out, torch_dtype=torch.float32)
    assert not any(p.is_meta for p in m.parameters())
    with torch.no_grad():
        m(*_inputs())
    wrong = Layers()
    wrong.lin = torch.nn.Linear(256, 32)
    with pytest.raises(aq.ModelFormatError, match=r"lin.weight.*shape \[64, 256\].*\[32, 256\]"):
        runtime.apply(wrong, out)
    with torch.device("meta"):
        bigger = Layers()
        bigger.extra = torch.nn.Linear(4, 4)
    with pytest.raises(aq.ModelFormatError, match="have no stored tensor.*extra"):
        runtime.apply(bigger, out)
    with pytest.raises(IndexError, match="emb.weight: index out of range"):
        m.emb(torch.tensor([300]))


def test_equalized_layers_scale_their_input(tmp_path):
    torch.manual_seed(1)
    model = TinyDenoiser()
    root = tmp_path / "model"
    _save_model(model, root)
    x = calib_inputs(64, 96, 1)
    x[:, 5] *= 40.0  # an outlier channel: equalization pays
    _record_two_passes(model, root, x, list(range(999, -1, -100)), 0.1, num_bins=2)
    _quantize(root, tmp_path / "q", scheme="affine", bit_width=4, group_size=32, num_time_groups=2)
    qm = aq.load(tmp_path / "q")
    eq = [n for n in qm.tensor_names() if qm[n].quantized and qm[n].input_scale is not None]
    if not eq:
        pytest.skip("the equalization search chose no layer on this model")
    ref = TinyDenoiser()
    ref.load_state_dict(qm.to_torch_state_dict())
    m = runtime.apply(TinyDenoiser(), tmp_path / "q")
    with torch.no_grad():
        got, want = m(x, 500.0), ref(x, 500.0)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    torch.manual_seed(2)
    model = TinyDenoiser()
    root = tmp_path_factory.mktemp("rt_w8a8") / "model"
    _save_model(model, root)
    _record_two_passes(model, root, calib_inputs(64, 96, 1), list(range(999, -1, -50)), 0.1, num_bins=4)
    out = root.parent / "q"
    _quantize(root, out, bit_width=8, group_size=64, activation_bits=8, num_time_groups=2, enable_spatial=False)
    return out


def test_timestep_group_selection(w8a8):
    qm = aq.load(w8a8)
    m = runtime.apply(TinyDenoiser(), w8a8)
    states = runtime.packed_layers(m)
    assert set(states) == {"inp", "mid", "out"} and all(s.acts is not None for s in states.values())
    x = torch.randn(4, 96)
    dense = TinyDenoiser()
    dense.load_state_dict(qm.to_torch_state_dict())
    for t in (20.0, 900.0):
        p = qm.activation_params("inp.weight", t)
        with torch.no_grad():
            with runtime.step(t):
                got = m.inp(x)
        # the input quantized on the group's grid, then the dequantized weight
        c = torch.clamp(torch.round(x / p["scale"]) + p["zero_point"], 0, 2 ** p["bits"] - 1)
        want = torch.nn.functional.linear((c - p["zero_point"]) * p["scale"], dense.inp.weight, dense.inp.bias)
        assert torch.equal(got, want), t
    g0, g1 = qm.activation_params("inp.weight", 20.0), qm.activation_params("inp.weight", 900.0)
    assert g0["group"] != g1["group"] and g0["scale"] != g1["scale"]
    # the denoiser's own timestep argument picks the group for every layer inside its call
    picked = []
    orig = states["mid"].acts.index
    states["mid"].acts.index = lambda t: picked.append(t) or orig(t)
    with torch.no_grad():
        m(x, 900.0)
        m(x, t=20.0)
    assert picked == [900.0, 20.0]
    with pytest.raises(aq.ConfigurationError, match="no timestep is known"):
        with torch.no_grad():
            m.mid(torch.randn(2, 192))
    weight_only = runtime.apply(TinyDenoiser(), w8a8, activations=False)
    with torch.no_grad():
        assert torch.equal(weight_only(x, 5.0), dense(x, 5.0))


def _load_dequantized(module, qm, comp):
    """The dequantized weights into a dense module (names and 1x1-conv shapes as diffusers and
    transformers load them)."""
    sd = module.state_dict()
    values = {}
    for k, v in qm.to_torch_state_dict(comp or None).items():
        key = k if k in sd else next(c for c in (k.split(".", 1)[1], f"{module.base_model_prefix}.{k}") if c in sd)
        values[key] = v.reshape(sd[key].shape)
    result = module.load_state_dict(values, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}, result  # tied head
    if hasattr(module, "tie_weights"):
        module.tie_weights()


@pytest.fixture(scope="module")
def dit_pipeline(tmp_path_factory):
    """A small DiTPipeline (diffusers classes, random init, bf16) saved in diffusers layout."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                        norm_type="ada_norm_zero").to(torch.bfloat16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
                        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("rt_dit") / "pipeline"
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    return path


def test_pipeline_round_trip(dit_pipeline, tmp_path):
    from diffusers import DiTPipeline

    out = tmp_path / "q"
    aq.ArrowQuantV2().quantize_diffusion_model(str(dit_pipeline), str(out),
                                               aq.DiffusionQuantConfig(components=["transformer", "vae"]))
    pipe = runtime.load_pipeline(out)
    assert type(pipe).__name__ == "DiTPipeline"
    assert runtime.packed_layers(pipe.transformer) and runtime.packed_layers(pipe.vae)
    assert pipe.transformer.dtype == torch.bfloat16
    ref = DiTPipeline.from_pretrained(dit_pipeline, torch_dtype=torch.bfloat16)
    qm = aq.load(out)
    for comp in ("transformer", "vae"):
        _load_dequantized(getattr(ref, comp), qm, comp)
    kw = dict(class_labels=[3], num_inference_steps=3, output_type="np")
    with torch.no_grad():
        got = pipe(generator=torch.Generator().manual_seed(0), **kw).images
        want = ref(generator=torch.Generator().manual_seed(0), **kw).images
    assert got.shape == want.shape == (1, 16, 16, 3) and np.isfinite(got).all()
    assert np.array_equal(got, want), float(np.abs(got - want).max())
    # the swapped layers hold their stored bytes (4.25 bits per weight, 8.25 for the sensitive
    # modulation, timestep and label-embedding layers), not 16-bit weights
    layers = runtime.packed_layers(pipe.transformer)
    assert runtime.resident_bytes(pipe.transformer)["packed"] == sum(
        qm[f"transformer/{n}.weight"].stored_bytes for n in layers)
    assert runtime.resident_bytes(pipe.transformer)["packed"] <= 0.45 * sum(s.numel * 2 for s in layers.values())
    mem = runtime.resident_bytes(pipe.transformer)
    assert mem["dense"] == sum(p.numel() * 2 for n, p in ref.transformer.named_parameters()
                               if n.rsplit(".", 1)[0] not in layers or not n.endswith("weight")) + sum(
        b.numel() * b.element_size() for b in ref.transformer.buffers())


def test_load_model_single_component(demo_quantized, dit_pipeline, tmp_path):
    path, _ = demo_quantized
    unet = runtime.load_model(path)  # the only quantized component
    assert type(unet).__name__ == "UNet2DConditionModel" and unet.dtype == torch.bfloat16
    assert runtime.packed_layers(unet)
    with pytest.raises(aq.UnsupportedFeatureError, match="on the CPU"):
        runtime.load_model(path, "unet", device="cuda")
    out = tmp_path / "q"
    aq.ArrowQuantV2().quantize_diffusion_model(str(dit_pipeline), str(out),
                                               aq.DiffusionQuantConfig(components=["transformer", "vae"]))
    with pytest.raises(aq.ConfigurationError, match="components"):
        runtime.load_model(out)
    vae = runtime.load_model(out, "vae", torch_dtype=torch.float32)
    assert type(vae).__name__ == "AutoencoderKL" and vae.dtype == torch.float32


def test_transformers_model_with_tied_embeddings(tmp_path):
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    src = tmp_path / "lm"
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(src)
    out = tmp_path / "q"
    aq.ArrowQuantV2().quantize_diffusion_model(str(src), str(out), aq.DiffusionQuantConfig(scheme="q8_0",
                                                                                              modality="text"))
    qm = aq.load(out)
    assert "lm_head.weight" not in qm.tensor_names()  # stored once, as the embedding
    model = runtime.load_model(out, torch_dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head" in runtime.packed_layers(model)
    ref = transformers.Qwen2ForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
    _load_dequantized(ref, qm, "")
    ids = torch.tensor([[1, 5, 300, 7, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    mem = runtime.resident_bytes(model)
    assert mem["packed"] == sum(qm[n].stored_bytes for n in qm.tensor_names() if qm[n].quantized)


def test_torch_absent_gives_an_import_error_naming_the_extra(tmp_path):
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(block), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", "import arrow_quant_v2.runtime"], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "arrow_quant_v2[torch]" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-c", "import arrow_quant_v2; print('ok')"], env=env, capture_output=True,
                       text=True)
    assert r.stdout.strip() == "ok", r.stderr
