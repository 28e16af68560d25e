"""arrow_quant_v2.load: names, values, state dicts, kept and integer tensors, and bad inputs."""

import json
import os
import shutil

import numpy as np
import pytest

import arrow_quant_v2 as aq
from arrow_quant_v2 import ArrowQuantV2, DiffusionQuantConfig, ModelFormatError, ModelNotFoundError

from conftest import read_safetensors, read_safetensors_raw, stored_values, write_model_file


@pytest.fixture
def mixed_model(tmp_path, rng):
    """Quantized single-file model holding every kind of tensor the loader must give back."""
    arrays = {
        "blocks.0.linear.weight": rng.standard_normal((48, 96)).astype(np.float32),
        "blocks.0.bf16.weight": rng.standard_normal((40, 64)).astype(np.float32),
        "blocks.0.f16.weight": rng.standard_normal((40, 64)).astype(np.float32),
        "blocks.0.linear.bias": rng.standard_normal(48).astype(np.float32),
        "blocks.0.bf16.bias": rng.standard_normal(40).astype(np.float32),
        "blocks.0.f16.bias": rng.standard_normal(40).astype(np.float32),
        "blocks.0.f64.bias": rng.standard_normal(40),
        "position_ids": np.arange(77, dtype=np.int64).reshape(1, 77),
        "token_type": np.arange(-5, 5, dtype=np.int32),
        "mask": (rng.random((4, 8)) > 0.5),
        "bytes": rng.integers(0, 255, size=(3, 5), dtype=np.uint8),
        "scale": np.array(2.5, np.float32),
    }
    dtypes = {"blocks.0.bf16.weight": "BF16", "blocks.0.f16.weight": "F16", "blocks.0.bf16.bias": "BF16",
              "blocks.0.f16.bias": "F16"}
    src = tmp_path / "src"
    src.mkdir()
    path = write_model_file(src / "model.safetensors", arrays, dtypes)
    out = tmp_path / "q"
    ArrowQuantV2().quantize_diffusion_model(path, out)
    return path, out, arrays, dtypes


def test_tensor_names_are_the_source_names_in_file_order(mixed_model):
    path, out, _, _ = mixed_model
    model = aq.load(out)
    names = list(read_safetensors_raw(path))
    assert model.tensor_names() == names
    assert list(model) == names and len(model) == len(names)
    assert all(n in model for n in names) and "nope" not in model
    assert model.components == [""]


def test_tensor_metadata_describes_the_source_and_the_scheme(mixed_model):
    path, out, _, _ = mixed_model
    model = aq.load(out)
    raw = read_safetensors_raw(path)
    for name, (dtype, shape, data) in raw.items():
        t = model[name]
        assert t.shape == tuple(shape) and t.dtype == dtype
        assert t.info["source_bytes"] == len(data)
        if t.quantized:
            assert t.bits == 4 and t.group_size == 128 and t.scheme == "int4_g128_asym"
        else:
            assert t.scheme == "raw" and t.bits is None and t.stored_bytes == len(data)
    assert {n for n in raw if model[n].quantized} == {"blocks.0.linear.weight", "blocks.0.bf16.weight",
                                                      "blocks.0.f16.weight"}


def test_kept_float_tensors_come_back_exactly(mixed_model):
    _, out, arrays, dtypes = mixed_model
    model = aq.load(out)
    expected = stored_values(arrays, dtypes)
    for name in ("blocks.0.linear.bias", "blocks.0.bf16.bias", "blocks.0.f16.bias", "scale"):
        got = model[name].numpy()
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected[name])
    # F64 kept tensors come back as float32 (the default) of the stored doubles
    np.testing.assert_array_equal(model["blocks.0.f64.bias"].numpy(), arrays["blocks.0.f64.bias"].astype(np.float32))


def test_integer_and_bool_tensors_come_back_unchanged_in_their_dtype(mixed_model):
    _, out, arrays, _ = mixed_model
    model = aq.load(out)
    for name in ("position_ids", "token_type", "mask", "bytes"):
        got = model[name].numpy()
        assert got.dtype == arrays[name].dtype, name
        np.testing.assert_array_equal(got, arrays[name])
        assert not model[name].quantized


def test_numpy_float16_is_the_float32_values_rounded(mixed_model):
    _, out, _, _ = mixed_model
    t = aq.load(out)["blocks.0.linear.weight"]
    f32 = t.numpy()
    f16 = t.numpy(np.float16)
    assert f32.dtype == np.float32 and f16.dtype == np.float16
    np.testing.assert_array_equal(f16, f32.astype(np.float16))
    np.testing.assert_array_equal(t.dequantize(), f32)


def test_state_dict_of_a_single_component_model(mixed_model):
    _, out, arrays, _ = mixed_model
    model = aq.load(out)
    sd = model.state_dict()
    assert list(sd) == model.tensor_names()
    for name, value in sd.items():
        np.testing.assert_array_equal(value, model[name].numpy())
    sd16 = model.state_dict(dtype=np.float16)
    assert sd16["blocks.0.linear.weight"].dtype == np.float16


def test_state_dict_of_a_pipeline_component_drops_the_prefix(demo_pipeline, demo_quantized):
    out, _ = demo_quantized
    model = aq.load(out)
    assert model.components == ["unet"]
    sd = model.state_dict("unet")
    source = read_safetensors(os.path.join(demo_pipeline, "unet", "diffusion_pytorch_model.safetensors"))
    assert list(sd) == list(source)
    for name, value in sd.items():
        assert value.shape == source[name].shape
        np.testing.assert_array_equal(value, model[f"unet/{name}"].numpy())
    assert model.tensor_names("unet") == [f"unet/{n}" for n in source]


def test_state_dict_without_a_component_on_a_one_component_pipeline_equals_naming_it(demo_quantized):
    out, _ = demo_quantized
    model = aq.load(out)
    assert list(model.state_dict()) == list(model.state_dict("unet"))


def test_state_dict_needs_a_component_when_there_are_several(demo_quantized_all):
    out, _ = demo_quantized_all
    model = aq.load(out)
    with pytest.raises(ValueError, match="component"):
        model.state_dict()
    with pytest.raises(KeyError, match="nope"):
        model.state_dict("nope")


def test_text_encoder_position_ids_stay_int64_when_every_component_is_quantized(demo_pipeline, demo_quantized_all):
    out, _ = demo_quantized_all
    model = aq.load(out)
    source = read_safetensors(os.path.join(demo_pipeline, "text_encoder", "model.safetensors"))
    ids = model["text_encoder/text_model.embeddings.position_ids"].numpy()
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, source["text_model.embeddings.position_ids"])
    sd = model.state_dict("text_encoder")
    assert set(sd) == set(source)


def test_unknown_tensor_name_raises_key_error_naming_it(mixed_model):
    _, out, _, _ = mixed_model
    with pytest.raises(KeyError, match="missing.weight"):
        aq.load(out)["missing.weight"]


def test_to_torch_state_dict_keeps_source_dtypes(mixed_model):
    torch = pytest.importorskip("torch")
    _, out, arrays, dtypes = mixed_model
    model = aq.load(out)
    sd = model.to_torch_state_dict()
    assert sd["blocks.0.bf16.weight"].dtype == torch.bfloat16
    assert sd["blocks.0.f16.weight"].dtype == torch.float16
    assert sd["blocks.0.linear.weight"].dtype == torch.float32
    assert sd["position_ids"].dtype == torch.int64
    np.testing.assert_array_equal(sd["position_ids"].numpy(), arrays["position_ids"])
    np.testing.assert_array_equal(sd["blocks.0.linear.weight"].numpy(), model["blocks.0.linear.weight"].numpy())
    sd32 = model.to_torch_state_dict(dtype=torch.float32)
    assert all(v.dtype == torch.float32 for v in sd32.values())


def test_load_of_a_missing_directory_raises_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError):
        aq.load(tmp_path / "nothing")


def test_load_of_a_directory_without_manifest_raises_model_format_error(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(ModelFormatError, match="manifest"):
        aq.load(tmp_path / "plain")


@pytest.mark.parametrize("mutate", ["not-json", "other-format", "future-version"])
def test_load_rejects_a_damaged_or_foreign_manifest(mixed_model, tmp_path, mutate):
    _, out, _, _ = mixed_model
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest_path = copy / "manifest.json"
    if mutate == "not-json":
        manifest_path.write_text("{broken")
    else:
        m = json.loads(manifest_path.read_text())
        if mutate == "other-format":
            m["format"] = "something-else"
        else:
            m["format_version"] = aq.FORMAT_VERSION + 1
        manifest_path.write_text(json.dumps(m))
    with pytest.raises(ModelFormatError):
        aq.load(copy)


def test_load_of_a_truncated_weights_file_raises_model_format_error(mixed_model, tmp_path):
    _, out, _, _ = mixed_model
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = (copy / "weights.parquet").read_bytes()
    (copy / "weights.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError):
        aq.load(copy)


def test_concurrent_reads_give_the_same_values_as_serial_reads(demo_quantized):
    from concurrent.futures import ThreadPoolExecutor

    out, _ = demo_quantized
    model = aq.load(out)
    names = model.tensor_names()
    serial = {n: model[n].numpy() for n in names}
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = dict(zip(names, pool.map(lambda n: model[n].numpy(), names)))
    for n in names:
        np.testing.assert_array_equal(parallel[n], serial[n])


def test_packed_form_of_a_kept_tensor_is_the_source_bytes(mixed_model):
    path, out, _, _ = mixed_model
    model = aq.load(out)
    raw = read_safetensors_raw(path)
    for name in ("blocks.0.bf16.bias", "position_ids", "mask"):
        p = model[name].packed()
        assert not p.quantized and p.scales is None and p.zero_points is None
        assert p.codes == raw[name][2]
        assert p.dtype == raw[name][0] and p.shape == raw[name][1]


def test_a_damaged_weights_row_raises_model_format_error_on_read(mixed_model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, out, _, _ = mixed_model
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    table = pq.read_table(copy / "weights.parquet")
    rows = table.to_pylist()
    for r in rows:
        if r["name"] == "blocks.0.linear.weight":
            r["codes"] = r["codes"][:-3]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), copy / "weights.parquet", row_group_size=1)
    model = aq.load(copy)
    with pytest.raises(ModelFormatError, match="blocks.0.linear.weight"):
        model["blocks.0.linear.weight"].numpy()
    # the other tensors still read
    model["blocks.0.bf16.weight"].numpy()


def test_version_1_directories_still_load(mixed_model, tmp_path):
    """Format version 2 only added the optional input_scale column: a version-1 directory (no such
    column, version 1 in the manifest and the Parquet metadata) loads to the same values."""
    import pyarrow.parquet as pq

    _, out, _, _ = mixed_model
    copy = tmp_path / "v1"
    shutil.copytree(out, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["format_version"] = 1
    (copy / "manifest.json").write_text(json.dumps(m))
    for comp in m["components"]:
        path = copy / comp["weights"]
        f = pq.ParquetFile(path)
        meta = dict(f.schema_arrow.metadata)
        meta[b"arrowquant.format_version"] = b"1"
        table = f.read().drop_columns(["input_scale"])
        table = table.replace_schema_metadata(meta)
        with pq.ParquetWriter(path, table.schema, compression="NONE", use_dictionary=False) as w:
            for i in range(table.num_rows):
                w.write_table(table.slice(i, 1))
    new, old = aq.load(out), aq.load(copy)
    assert old.manifest["format_version"] == 1
    for name in new:
        if new[name].quantized or new[name].dtype in ("F32", "F16", "BF16"):
            np.testing.assert_array_equal(old[name].numpy(), new[name].numpy())
            assert old[name].input_scale is None
