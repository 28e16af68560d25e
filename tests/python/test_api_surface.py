"""The seed's API surface: the entry class, its mode, and the exception hierarchy."""

import pytest

import arrow_quant_v2 as aq
from arrow_quant_v2 import (
    ArrowQuantError,
    ArrowQuantV2,
    ConfigurationError,
    DiffusionQuantConfig,
    ModelFormatError,
    ModelNotFoundError,
    NonFiniteWeightError,
    QuantizationError,
    UnsupportedFeatureError,
    ValidationError,
)

EXCEPTIONS = [QuantizationError, ConfigurationError, ValidationError, ModelNotFoundError, ModelFormatError,
              NonFiniteWeightError, UnsupportedFeatureError]


def test_diffusion_mode_constructs_and_is_the_default():
    assert ArrowQuantV2(mode="diffusion").mode == "diffusion"
    assert ArrowQuantV2().mode == "diffusion"


@pytest.mark.parametrize("mode", ["llm", "Diffusion", "", None])
def test_unknown_mode_raises_configuration_error_naming_mode(mode):
    with pytest.raises(ConfigurationError, match="mode"):
        ArrowQuantV2(mode=mode)


def test_seed_methods_exist_and_are_callable():
    q = ArrowQuantV2()
    for name in ("quantize_diffusion_model", "validate_quality", "quantize"):
        assert callable(getattr(q, name))
    assert callable(DiffusionQuantConfig.from_profile)


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda c: c.__name__)
def test_every_exception_is_exported_and_shares_the_base_class(cls):
    assert getattr(aq, cls.__name__) is cls
    assert cls.__name__ in aq.__all__
    assert issubclass(cls, ArrowQuantError)
    assert issubclass(cls, Exception)


def test_configuration_error_is_a_value_error():
    assert issubclass(ConfigurationError, ValueError)
    with pytest.raises(ValueError):
        DiffusionQuantConfig(bit_width=7)


def test_model_not_found_error_is_a_quantization_error_and_a_file_not_found_error():
    assert issubclass(ModelNotFoundError, QuantizationError)
    assert issubclass(ModelNotFoundError, FileNotFoundError)


def test_errors_from_the_core_are_catchable_as_file_not_found_and_carry_the_class_code(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError) as info:
        ArrowQuantV2().quantize_diffusion_model(missing, tmp_path / "out")
    assert type(info.value) is ModelNotFoundError
    assert info.value.code == ModelNotFoundError.code


def test_package_exposes_version_and_format_version():
    assert isinstance(aq.__version__, str) and aq.__version__
    assert aq.FORMAT_VERSION == aq._core.FORMAT_VERSION
    assert isinstance(aq.FORMAT_VERSION, int) and aq.FORMAT_VERSION >= 1
