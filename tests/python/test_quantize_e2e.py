"""quantize_diffusion_model end to end on every input layout: a .safetensors file, a Hugging Face
directory (single and sharded), and a diffusers pipeline. Figures in the result are recomputed
from the files."""

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

import arrow_quant_v2 as aq
from arrow_quant_v2 import ArrowQuantV2, DiffusionQuantConfig

from conftest import (
    WEIGHTS_COLUMNS,
    directory_bytes,
    file_digest,
    layer_weights,
    leftovers,
    np_cosine,
    parquet_stored_bytes,
    read_safetensors,
    source_data_bytes,
    stored_values,
    write_model_file,
)

SEED_RESULT_KEYS = {"quantized_path", "compression_ratio", "cosine_similarity", "model_size_mb", "modality",
                    "bit_width", "quantization_time_s"}
RESULT_KEYS = SEED_RESULT_KEYS | {"layers", "skipped", "fallbacks", "errors", "time_aware", "spatial",
                                  "warnings", "bits_per_weight"}


def check_result_against_files(result, source_files, out, components=("",)):
    """Properties every result must have, recomputed from the source and output files."""
    assert RESULT_KEYS <= set(result)
    assert os.path.samefile(result["quantized_path"], out)
    assert os.path.isabs(result["quantized_path"])
    weights = [os.path.join(out, c, "weights.parquet") if c else os.path.join(out, "weights.parquet")
               for c in components]
    stored = sum(parquet_stored_bytes(w) for w in weights)
    source = source_data_bytes(source_files)
    assert result["compression_ratio"] == pytest.approx(source / stored, rel=1e-12)
    assert result["model_size_mb"] == pytest.approx(directory_bytes(out) / 2 ** 20, rel=1e-12)
    quantized = [l for l in result["layers"] if l["quantized"]]
    assert quantized, "nothing was quantized"
    assert result["cosine_similarity"] == pytest.approx(np.mean([l["cosine_similarity"] for l in quantized]),
                                                        rel=1e-12)
    assert isinstance(result["quantization_time_s"], float) and result["quantization_time_s"] >= 0
    for key in ("time_aware", "spatial"):
        assert result[key]["applied"] is False
        assert isinstance(result[key]["reason"], str) and result[key]["reason"]
    kept = {l["name"] for l in result["layers"] if not l["quantized"]}
    assert {s["name"] for s in result["skipped"]} == kept
    assert all(s["reason"] for s in result["skipped"])
    assert result["errors"] == [] and result["fallbacks"] == []
    assert leftovers(os.path.dirname(os.path.abspath(out))) == []


def check_loaded_equals_in_memory(out, sources, config, prefix=""):
    """Each quantized tensor loads as exactly what the in-memory quantizer gives for the same
    float32 values; numpy cosines agree with the recorded ones."""
    model = aq.load(out)
    q = ArrowQuantV2()
    n_quantized = 0
    for name, values in sources.items():
        t = model[prefix + name]
        loaded = t.numpy()
        if not t.quantized:
            continue
        n_quantized += 1
        mem = q.quantize({name: values.astype(np.float32)}, config=config)[name]
        assert mem.quantized and mem.bits == t.bits
        np.testing.assert_array_equal(loaded, mem.dequantize())
        assert np_cosine(values, loaded) == pytest.approx(t.cosine_similarity, abs=1e-9)
    return n_quantized


def test_single_safetensors_file(small_model, tmp_path, quantizer):
    path, values = small_model
    out = tmp_path / "out"
    config = DiffusionQuantConfig()
    result = quantizer.quantize_diffusion_model(path, out, config=config)
    check_result_against_files(result, [path], out)
    assert result["bit_width"] == 4
    assert result["layout"] == "safetensors-file"
    assert sorted(os.listdir(out)) == ["manifest.json", "weights.parquet"]
    assert [l["name"] for l in result["layers"]] == list(values)  # every tensor, in file order
    assert check_loaded_equals_in_memory(out, {k: v for k, v in values.items() if v.dtype.kind == "f"},
                                         config) == 3
    reported = {l["name"]: l["cosine_similarity"] for l in result["layers"] if l["quantized"]}
    model = aq.load(out)
    for name, cos in reported.items():
        assert np_cosine(values[name], model[name].numpy()) == pytest.approx(cos, abs=1e-9)


def test_hf_directory_with_llada_config_reports_text_and_copies_side_files(tmp_path, rng, quantizer):
    src = tmp_path / "llada"
    src.mkdir()
    arrays = {
        "model.transformer.blocks.0.att_proj.weight": rng.standard_normal((96, 64)).astype(np.float32),
        "model.transformer.blocks.0.ff_proj.weight": rng.standard_normal((128, 64)).astype(np.float32),
        "model.transformer.blocks.0.attn_norm.weight": np.ones(64, np.float32),
    }
    dtypes = {n: "BF16" for n in arrays}
    write_model_file(src / "model.safetensors", arrays, dtypes)
    (src / "config.json").write_text(json.dumps({"model_type": "llada", "architectures": ["LLaDAModelLM"]}))
    (src / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    (src / "generation_config.json").write_text("{}")
    out = tmp_path / "llada-int4"
    config = DiffusionQuantConfig()
    result = quantizer.quantize_diffusion_model(src, out, config=config)
    check_result_against_files(result, [src / "model.safetensors"], out)
    assert result["modality"] == "text"
    assert result["layout"] == "huggingface"
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert file_digest(out / f) == file_digest(src / f)
    assert not (out / "model.safetensors").exists()
    assert check_loaded_equals_in_memory(out, stored_values(arrays, dtypes), config) == 2


def test_sharded_hf_directory_is_quantized_as_one_model(tmp_path, rng, quantizer):
    src = tmp_path / "sharded"
    src.mkdir()
    arrays = layer_weights(rng, 5, shape=(64, 96), prefix="model.layers")
    arrays["model.norm.weight"] = np.ones(96, np.float32)
    names = list(arrays)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    dtypes = {n: "BF16" for n in names}
    for fname, members in shards.items():
        write_model_file(src / fname, {n: arrays[n] for n in members}, dtypes)
    weight_map = {n: f for f, members in shards.items() for n in members}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps({"model_type": "dream", "architectures": ["DreamModel"]}))
    out = tmp_path / "sharded-int4"
    config = DiffusionQuantConfig()
    result = quantizer.quantize_diffusion_model(src, out, config=config)
    check_result_against_files(result, [src / f for f in shards], out)
    assert sorted(l["name"] for l in result["layers"]) == sorted(names)
    assert sorted(os.listdir(out)) == ["config.json", "manifest.json", "weights.parquet"]
    assert check_loaded_equals_in_memory(out, stored_values(arrays, dtypes), config) == 5
    assert aq.load(out).tensor_names() and set(aq.load(out).tensor_names()) == set(names)


def test_diffusers_pipeline_quantizes_the_unet_and_copies_the_rest(demo_pipeline, demo_quantized):
    out, result = demo_quantized
    unet_file = os.path.join(demo_pipeline, "unet", "diffusion_pytorch_model.safetensors")
    check_result_against_files(result, [unet_file], out, components=("unet",))
    assert result["modality"] == "image"
    assert result["layout"] == "diffusers"
    assert [c["name"] for c in result["components"]] == ["unet"]
    source_names = list(read_safetensors(unet_file))
    assert [l["name"] for l in result["layers"]] == [f"unet/{n}" for n in source_names]
    assert os.path.exists(os.path.join(out, "manifest.json"))
    assert os.path.exists(os.path.join(out, "unet", "weights.parquet"))
    assert not os.path.exists(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    # everything but the unet weights is copied verbatim
    for comp, fname in (("text_encoder", "model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors")):
        assert file_digest(os.path.join(out, comp, fname)) == file_digest(os.path.join(demo_pipeline, comp, fname))
    for rel in ("model_index.json", "unet/config.json", "text_encoder/config.json", "vae/config.json",
                "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json"):
        assert file_digest(os.path.join(out, rel)) == file_digest(os.path.join(demo_pipeline, rel)), rel
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["format"] == "arrowquant" and manifest["format_version"] == aq.FORMAT_VERSION
    assert manifest["modality"] == "image"


def test_diffusers_unet_values_equal_in_memory_quantization(demo_pipeline, demo_quantized):
    out, _ = demo_quantized
    sources = read_safetensors(os.path.join(demo_pipeline, "unet", "diffusion_pytorch_model.safetensors"))
    assert check_loaded_equals_in_memory(out, sources, DiffusionQuantConfig(), prefix="unet/") > 50


def test_components_all_quantizes_every_component(demo_pipeline, demo_quantized_all):
    out, result = demo_quantized_all
    comps = ["text_encoder", "unet", "vae"]
    files = {"text_encoder": "model.safetensors", "unet": "diffusion_pytorch_model.safetensors",
             "vae": "diffusion_pytorch_model.safetensors"}
    check_result_against_files(result, [os.path.join(demo_pipeline, c, files[c]) for c in comps], out,
                               components=comps)
    assert sorted(c["name"] for c in result["components"]) == comps
    assert sorted(aq.load(out).components) == comps
    for c in comps:
        assert os.path.exists(os.path.join(out, c, "weights.parquet"))
        assert not os.path.exists(os.path.join(out, c, files[c]))
        assert os.path.exists(os.path.join(out, c, "config.json"))
    quantized_components = {l["component"] for l in result["layers"] if l["quantized"]}
    assert quantized_components == set(comps)


def test_weights_parquet_has_the_documented_schema_and_one_row_group_per_tensor(small_model, tmp_path, quantizer):
    path, values = small_model
    out = tmp_path / "out"
    result = quantizer.quantize_diffusion_model(path, out)
    f = pq.ParquetFile(out / "weights.parquet")
    assert f.schema_arrow.names == WEIGHTS_COLUMNS
    assert f.metadata.num_row_groups == len(values) == f.metadata.num_rows
    for i in range(f.metadata.num_row_groups):
        assert f.metadata.row_group(i).num_rows == 1
    rows = f.read().to_pylist()
    assert [r["name"] for r in rows] == list(values)
    by_layer = {l["name"]: l for l in result["layers"]}
    for r in rows:
        layer = by_layer[r["name"]]
        assert r["shape"] == list(values[r["name"]].shape)
        assert r["encoding"] == ("quantized" if layer["quantized"] else "raw")
        if layer["quantized"]:
            assert r["scheme"]["bits"] == layer["bits"]
            assert r["scheme"]["group_size"] == layer["group_size"]
            assert r["metrics"]["cosine"] == layer["cosine_similarity"]
            assert r["zero_points"] is not None  # asymmetric by default
        else:
            assert r["scheme"] is None and r["scales"] is None and r["zero_points"] is None
            assert r["codes"] == values[r["name"]].tobytes()
        assert r["reason"] == layer["reason"]
        assert r["rejected_bits"] == []
        assert r["input_scale"] is None  # no calibration: no channel equalization


def test_manifest_records_config_summary_and_copied_files(demo_pipeline, demo_quantized):
    out, result = demo_quantized
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["config"]["bit_width"] == result["bit_width"]
    assert manifest["summary"]["compression_ratio"] == result["compression_ratio"]
    assert manifest["summary"]["cosine_similarity"] == result["cosine_similarity"]
    for rel in manifest["copied_files"]:
        assert file_digest(os.path.join(out, rel)) == file_digest(os.path.join(demo_pipeline, rel))


def test_modality_set_in_the_config_overrides_detection(small_model, tmp_path, quantizer):
    path, _ = small_model
    result = quantizer.quantize_diffusion_model(path, tmp_path / "out", DiffusionQuantConfig(modality="audio"))
    assert result["modality"] == "audio"
    assert aq.load(tmp_path / "out").modality == "audio"


def test_profile_settings_reach_every_default_layer(small_model, tmp_path, quantizer):
    path, _ = small_model
    result = quantizer.quantize_diffusion_model(path, tmp_path / "out", DiffusionQuantConfig.from_profile("cloud"))
    assert result["bit_width"] == 8
    assert result["deployment_profile"] == "cloud"
    for layer in result["layers"]:
        if layer["quantized"]:
            # the profile's scheme: ggml's Q8_0 (blocks of 32, symmetric)
            assert (layer["bits"], layer["group_size"], layer["symmetric"]) == (8, 32, True)
            assert layer["scheme"] == "q8_0"
            assert layer["bits_per_weight"] <= 8.5


def test_relative_paths_are_resolved_against_the_working_directory(small_model, tmp_path, quantizer, monkeypatch):
    path, _ = small_model
    monkeypatch.chdir(tmp_path)
    result = quantizer.quantize_diffusion_model(os.path.relpath(path, tmp_path), "rel-out")
    assert os.path.samefile(result["quantized_path"], tmp_path / "rel-out")


def test_output_path_with_a_trailing_slash_works(small_model, tmp_path, quantizer):
    # The seed's own example writes to "dream-7b-int2/".
    path, _ = small_model
    out = os.path.join(tmp_path, "with-slash") + os.sep
    result = quantizer.quantize_diffusion_model(path, out)
    assert os.path.exists(os.path.join(out, "manifest.json"))
    assert os.path.samefile(result["quantized_path"], out)
    assert aq.load(out).tensor_names()


def test_input_directory_with_a_trailing_slash_works(tmp_path, rng, quantizer):
    src = tmp_path / "src"
    src.mkdir()
    write_model_file(src / "model.safetensors", layer_weights(rng, 2))
    result = quantizer.quantize_diffusion_model(str(src) + os.sep, tmp_path / "out")
    assert len(result["layers"]) == 2


def test_sensitive_and_small_tensors_follow_the_layer_policy(tmp_path, rng, quantizer):
    src = tmp_path / "src"
    src.mkdir()
    arrays = {
        "time_embedding.linear_1.weight": rng.standard_normal((64, 32)).astype(np.float32),  # sensitive
        "blocks.0.linear.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "blocks.0.small.weight": rng.standard_normal((16, 16)).astype(np.float32),  # 256 < 1024
        "blocks.0.skipme.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "blocks.0.override.weight": rng.standard_normal((64, 32)).astype(np.float32),
    }
    write_model_file(src / "model.safetensors", arrays)
    config = DiffusionQuantConfig(bit_width=2, skip_patterns=["skipme"], bit_overrides={"override": 3},
                                  enable_fallback=False)
    result = quantizer.quantize_diffusion_model(src, tmp_path / "out", config)
    layers = {l["name"]: l for l in result["layers"]}
    assert layers["time_embedding.linear_1.weight"]["bits"] == config.sensitive_bit_width
    assert layers["blocks.0.linear.weight"]["bits"] == 2
    assert layers["blocks.0.override.weight"]["bits"] == 3
    assert not layers["blocks.0.small.weight"]["quantized"]
    assert not layers["blocks.0.skipme.weight"]["quantized"]
    model = aq.load(tmp_path / "out")
    np.testing.assert_array_equal(model["blocks.0.skipme.weight"].numpy(), arrays["blocks.0.skipme.weight"])
    np.testing.assert_array_equal(model["blocks.0.small.weight"].numpy(), arrays["blocks.0.small.weight"])


def test_quantizing_a_model_with_an_empty_matrix_succeeds(tmp_path, rng, quantizer):
    # safetensors allows zero-sized tensors; with min_tensor_size=0 they are planned for
    # quantization and must still round-trip.
    src = tmp_path / "src"
    src.mkdir()
    arrays = {"blocks.0.linear.weight": rng.standard_normal((32, 64)).astype(np.float32),
              "blocks.0.empty.weight": np.zeros((0, 64), np.float32)}
    write_model_file(src / "model.safetensors", arrays)
    quantizer.quantize_diffusion_model(src, tmp_path / "out", DiffusionQuantConfig(min_tensor_size=0))
    assert aq.load(tmp_path / "out")["blocks.0.empty.weight"].numpy().shape == (0, 64)


def test_unaligned_tensor_data_is_read_correctly(tmp_path, rng, quantizer):
    # safetensors does not require alignment: a 3-byte tensor first puts the float data at odd offsets
    import struct

    w = rng.standard_normal((32, 64)).astype(np.float32)
    h = rng.standard_normal((32, 64)).astype(np.float16)
    u = np.array([1, 2, 3], np.uint8)
    header = {"a.u8": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "b.weight": {"dtype": "F32", "shape": [32, 64], "data_offsets": [3, 3 + w.nbytes]},
              "c.weight": {"dtype": "F16", "shape": [32, 64], "data_offsets": [3 + w.nbytes, 3 + w.nbytes + h.nbytes]}}
    text = json.dumps(header).encode()
    if len(text) % 8 == 0:
        text += b" "  # keep the data section itself off 8-byte alignment too
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + u.tobytes() + w.tobytes() + h.tobytes())
    out = tmp_path / "out"
    quantizer.quantize_diffusion_model(src, out)
    model = aq.load(out)
    mem = quantizer.quantize({"b.weight": w, "c.weight": h})
    np.testing.assert_array_equal(model["b.weight"].numpy(), mem["b.weight"].dequantize())
    np.testing.assert_array_equal(model["c.weight"].numpy(), mem["c.weight"].dequantize())
    np.testing.assert_array_equal(model["a.u8"].numpy(), u)
    assert quantizer.validate_quality(src, out)["passed"] is True


@pytest.mark.parametrize("settings", [{}, {"bit_width": 3}, {"scheme": "q4_k"}, {"scheme": "q8_0"},
                                      {"scheme": "entropy"}], ids=["affine4", "affine3", "q4_k", "q8_0", "entropy"])
def test_big_tensors_in_pieces_load_and_validate_as_when_stored_whole(tmp_path, rng, quantizer, settings):
    # piece_bytes=4096: every tensor here is stored in pieces, and its codes are spilled to a
    # scratch file while they are made (what a 7B model's embedding gets at the default 64 MiB)
    arrays = {"blocks.0.ff.weight": rng.standard_t(4.0, size=(6000, 32)).astype(np.float32),
              "blocks.0.proj.weight": rng.standard_normal((3000, 64)).astype(np.float32),
              "blocks.0.attn.weight": rng.standard_normal((520, 256)).astype(np.float32),
              "blocks.0.keep.weight": rng.standard_normal((4000, 48)).astype(np.float32)}
    (tmp_path / "src").mkdir()
    src = write_model_file(tmp_path / "src" / "model.safetensors", arrays)
    whole, pieces, pieces1 = tmp_path / "whole", tmp_path / "pieces", tmp_path / "pieces1"
    cfg = dict(settings, skip_patterns=["keep"])
    a = quantizer.quantize_diffusion_model(src, whole, config=aq.DiffusionQuantConfig(**cfg))
    b = quantizer.quantize_diffusion_model(src, pieces, config=aq.DiffusionQuantConfig(piece_bytes=4096, **cfg))
    c = quantizer.quantize_diffusion_model(src, pieces1, config=aq.DiffusionQuantConfig(piece_bytes=4096, num_threads=1,
                                                                                          **cfg))
    assert a["compression_ratio"] == b["compression_ratio"] == c["compression_ratio"]
    assert [x.get("cosine_similarity") for x in a["layers"]] == [x.get("cosine_similarity") for x in b["layers"]]
    f = pq.ParquetFile(pieces / "weights.parquet")
    assert f.metadata.num_row_groups > len(arrays)
    t = f.read(columns=["name", "piece", "row_start", "row_count"]).to_pylist()
    for name, w in arrays.items():
        rows = [r for r in t if r["name"] == name]
        assert [r["piece"] for r in rows] == list(range(len(rows))) and len(rows) > 1
        assert sum(r["row_count"] for r in rows) == w.shape[0]
    ma, mb, mc = aq.load(whole), aq.load(pieces), aq.load(pieces1)
    for name in arrays:
        pa, pb, pc = ma[name].packed(), mb[name].packed(), mc[name].packed()
        assert bytes(pa.codes) == bytes(pb.codes) == bytes(pc.codes), name
        np.testing.assert_array_equal(ma[name].numpy(), mb[name].numpy())
        # read a block of rows at a time (what export does): the same values, one piece in memory
        t, ref = mb[name], ma[name].numpy()
        assert len(t.pieces) > 1 and ma[name].pieces == [(0, ref.shape[0])]
        blocks = list(t.float_rows(block_values=5000))
        # at most 5000 values, or one piece's rows (entropy codes decode in whole chunks)
        limit = max(n for _, n in t.pieces) * ref[0].size if t.scheme.startswith("entropy") else 5000
        assert max(x.size for x in blocks) <= limit and len(blocks) >= len(t.pieces)
        np.testing.assert_array_equal(np.concatenate(blocks), ref)
        r0, r1 = t.pieces[0][1] - 7, t.pieces[1][0] + t.pieces[1][1] + 3  # across three pieces
        np.testing.assert_array_equal(np.concatenate(list(t.float_rows(r0, r1))), ref[r0:r1])
        if not t.scheme.startswith("entropy"):  # ggml blocks, kept values, affine rows of whole bytes
            got = np.concatenate(list(t.stored_rows(r0, r1)))
            assert got.tobytes() == bytes(pa.codes)[r0 * got.shape[1]:r1 * got.shape[1]]
            parts = list(t.packed_pieces())
            assert [p.shape[0] for p in parts] == [n for _, n in t.pieces]
            assert b"".join(bytes(p.codes) for p in parts) == bytes(pa.codes)
            if t.quantized and not t.info.get("ggml_type"):
                np.testing.assert_array_equal(np.concatenate([p.scales for p in parts]), pa.scales)
        else:
            with pytest.raises(ValueError, match="not whole bytes"):
                next(t.stored_rows())
        with pytest.raises(IndexError, match="out of range"):
            next(t.float_rows(0, ref.shape[0] + 1))
        if t.quantized:  # the runtime's packed layer, its pieces appended one by one: the same bytes
            la, lb = ma[name]._reader.layer(ma[name]._index), t._reader.layer(t._index)
            oa, ob = np.empty(ref.shape, np.float32), np.empty(ref.shape, np.float32)
            la.decode_into(oa)
            lb.decode_into(ob)
            assert la.nbytes == lb.nbytes and np.array_equal(oa, ob)
    assert not mb["blocks.0.keep.weight"].quantized
    np.testing.assert_array_equal(mb["blocks.0.keep.weight"].numpy(), arrays["blocks.0.keep.weight"])
    # nothing of the run is left beside the output (the scratch files are unnamed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pieces", "pieces1", "src", "whole"]
    assert quantizer.validate_quality(src, pieces)["passed"] is True
