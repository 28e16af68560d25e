"""Determinism: the output does not depend on the number of threads or on the run."""

import numpy as np
import pytest

from arrow_quant_v2 import ArrowQuantV2, DiffusionQuantConfig

from conftest import file_digest, write_model_file


@pytest.fixture(scope="module")
def multi_block_model(tmp_path_factory):
    # 600 rows of 300 columns: several of the engine's row blocks per tensor, so threads really
    # split tensors; plus enough tensors to keep a window of them in flight.
    rng = np.random.default_rng(5)
    arrays = {f"blocks.{i}.linear.weight": rng.standard_t(5.0, size=(600, 300)).astype(np.float32)
              for i in range(6)}
    arrays["blocks.0.norm.weight"] = np.ones(300, np.float32)
    d = tmp_path_factory.mktemp("det")
    write_model_file(d / "model.safetensors", arrays, {n: "BF16" for n in arrays})
    return d / "model.safetensors", arrays


@pytest.mark.parametrize("profile", ["edge", "cloud"])
def test_one_and_two_threads_give_byte_identical_weights(multi_block_model, tmp_path, profile):
    path, _ = multi_block_model
    q = ArrowQuantV2()
    digests = []
    for threads in (1, 2):
        out = tmp_path / f"out-{threads}"
        result = q.quantize_diffusion_model(path, out, DiffusionQuantConfig.from_profile(profile, num_threads=threads))
        assert result["num_threads"] == threads
        digests.append(file_digest(out / "weights.parquet"))
    assert digests[0] == digests[1]


def test_repeated_runs_give_byte_identical_weights(multi_block_model, tmp_path):
    path, _ = multi_block_model
    q = ArrowQuantV2()
    cfg = DiffusionQuantConfig(num_threads=2, bit_width=3, group_size=64)
    q.quantize_diffusion_model(path, tmp_path / "a", cfg)
    q.quantize_diffusion_model(path, tmp_path / "b", cfg)
    assert file_digest(tmp_path / "a" / "weights.parquet") == file_digest(tmp_path / "b" / "weights.parquet")


def test_in_memory_quantize_does_not_depend_on_threads(multi_block_model):
    _, arrays = multi_block_model
    q = ArrowQuantV2()
    a = q.quantize(arrays, config=DiffusionQuantConfig(num_threads=1))
    b = q.quantize(arrays, config=DiffusionQuantConfig(num_threads=2))
    for name in arrays:
        assert a[name].quantized == b[name].quantized
        if a[name].quantized:
            assert a[name].codes == b[name].codes
            assert a[name].scales.tobytes() == b[name].scales.tobytes()
            assert a[name].zero_points.tobytes() == b[name].zero_points.tobytes()
            assert a[name].cosine_similarity == b[name].cosine_similarity
