"""DiffusionQuantConfig: the seed's defaults, deployment profiles, validation, round trips."""

import json

import numpy as np
import pytest

from arrow_quant_v2 import ArrowQuantV2, ConfigurationError, DiffusionQuantConfig
from arrow_quant_v2.config import PROFILE_SETTINGS

SEED_DEFAULTS = {
    "bit_width": 4,
    "modality": None,
    "num_time_groups": 10,
    "group_size": 128,
    "enable_time_aware": True,
    "enable_spatial": True,
    "min_accuracy": 0.85,
    "calibration_samples": 128,
    "deployment_profile": "local",
    "fail_fast": False,
}

# The profiles as documented: edge INT2 groups of 64, local INT4 groups of 128, cloud INT8 per
# channel (group_size 0) with symmetric codes.
PROFILE_EXPECTATIONS = {
    "edge": {"bit_width": 2, "group_size": 64},
    "local": {"bit_width": 4, "group_size": 128},
    "cloud": {"bit_width": 8, "group_size": 0, "symmetric": True},
}


def test_defaults_are_the_seed_defaults():
    cfg = DiffusionQuantConfig()
    for name, value in SEED_DEFAULTS.items():
        got = getattr(cfg, name)
        assert got == value and type(got) is type(value), name


@pytest.mark.parametrize("profile", ["edge", "local", "cloud"])
def test_from_profile_applies_the_documented_profile(profile):
    cfg = DiffusionQuantConfig.from_profile(profile)
    assert cfg.deployment_profile == profile
    for name, value in PROFILE_EXPECTATIONS[profile].items():
        assert getattr(cfg, name) == value, name
    for name, value in PROFILE_SETTINGS[profile].items():
        assert getattr(cfg, name) == value, name


@pytest.mark.parametrize("profile", ["edge", "local", "cloud"])
def test_profile_keyword_equals_from_profile(profile):
    assert DiffusionQuantConfig(deployment_profile=profile) == DiffusionQuantConfig.from_profile(profile)


def test_explicit_field_wins_over_profile_and_the_rest_comes_from_the_profile():
    cfg = DiffusionQuantConfig(deployment_profile="edge", bit_width=3)
    assert cfg.bit_width == 3
    assert cfg.deployment_profile == "edge"
    for name, value in PROFILE_SETTINGS["edge"].items():
        if name not in ("bit_width", "scheme"):
            assert getattr(cfg, name) == value, name
    # the profile's ggml scheme follows the width asked for: Q2_K at 2 bits, Q3_K at 3
    assert cfg.scheme == "q3_k"


def test_a_ggml_scheme_sets_bit_width_and_both_given_must_agree():
    assert DiffusionQuantConfig(scheme="Q6_K").bit_width == 6
    assert DiffusionQuantConfig(scheme="q2_k").scheme == "q2_k"
    assert DiffusionQuantConfig(scheme="iq4_xs", bit_width=4).bit_width == 4
    with pytest.raises(ConfigurationError, match="'q2_k' is 2-bit; bit_width=4"):
        DiffusionQuantConfig(scheme="q2_k", bit_width=4)
    with pytest.raises(ConfigurationError, match="scheme"):
        DiffusionQuantConfig(scheme="q7_k")
    cfg = DiffusionQuantConfig(scheme="q4_k")
    cfg.bit_width = 8  # another width on a ggml scheme: the ggml type of that width
    assert cfg.scheme == "q8_0"
    assert DiffusionQuantConfig(scheme="q8_0").replace(bit_width=3).scheme == "q3_k"


def test_from_profile_accepts_overrides():
    cfg = DiffusionQuantConfig.from_profile("cloud", group_size=128, fail_fast=True)
    assert (cfg.bit_width, cfg.group_size, cfg.symmetric, cfg.fail_fast) == (8, 128, True, True)


@pytest.mark.parametrize("profile", ["mobile", "EDGE", "", None, 3])
def test_from_profile_rejects_unknown_profiles(profile):
    with pytest.raises(ConfigurationError, match="deployment_profile"):
        DiffusionQuantConfig.from_profile(profile)


@pytest.mark.parametrize(
    "field,value",
    [
        ("bit_width", 7),
        ("bit_width", 1),
        ("bit_width", 16),
        ("bit_width", 4.0),
        ("bit_width", True),
        ("bit_width", "4"),
        ("group_size", 100),
        ("group_size", -32),
        ("group_size", 512),
        ("min_accuracy", 1.5),
        ("min_accuracy", -0.1),
        ("min_accuracy", "high"),
        ("modality", "video"),
        ("modality", 3),
        ("deployment_profile", "mobile"),
        ("num_time_groups", 0),
        ("calibration_samples", 0),
        ("enable_time_aware", "yes"),
        ("enable_spatial", 1),
        ("fail_fast", None),
        ("symmetric", "no"),
        ("scale_method", "mse"),
        ("enable_fallback", 0),
        ("num_threads", -1),
        ("nonfinite", "zero"),
        ("overwrite", "true"),
        ("min_tensor_size", -5),
        ("sensitive_bit_width", 7),
        ("skip_patterns", "norm"),
        ("skip_patterns", ["("]),
        ("skip_patterns", [3]),
        ("sensitive_patterns", ["[unclosed"]),
        ("bit_overrides", {"attn": 7}),
        ("bit_overrides", {"(": 4}),
        ("bit_overrides", ["attn"]),
        ("components", [""]),
    ],
)
def test_invalid_value_raises_configuration_error_naming_the_field(field, value):
    with pytest.raises(ConfigurationError) as info:
        DiffusionQuantConfig(**{field: value})
    assert field in str(info.value)


def test_unknown_keyword_raises_configuration_error_naming_it():
    with pytest.raises(ConfigurationError, match="bitwidth"):
        DiffusionQuantConfig(bitwidth=4)


def test_invalid_regex_in_skip_patterns_names_the_field_and_pattern():
    with pytest.raises(ConfigurationError) as info:
        DiffusionQuantConfig(skip_patterns=["norm", "attn[0-"])
    assert "skip_patterns" in str(info.value) and "attn[0-" in str(info.value)


def test_bit_overrides_value_7_is_rejected_naming_the_pattern():
    with pytest.raises(ConfigurationError) as info:
        DiffusionQuantConfig(bit_overrides={"to_q": 7})
    assert "bit_overrides" in str(info.value) and "to_q" in str(info.value)


def test_assignment_after_construction_is_validated_and_leaves_the_old_value():
    cfg = DiffusionQuantConfig()
    with pytest.raises(ConfigurationError, match="bit_width"):
        cfg.bit_width = 7
    assert cfg.bit_width == 4
    cfg.bit_width = 8
    assert cfg.bit_width == 8
    with pytest.raises(ConfigurationError, match="group_size"):
        cfg.group_size = 100
    assert cfg.group_size == 128


def test_assigning_an_unknown_attribute_is_rejected():
    cfg = DiffusionQuantConfig()
    with pytest.raises(ConfigurationError, match="bitwidth"):
        cfg.bitwidth = 4


def test_modality_is_normalised_to_lower_case():
    assert DiffusionQuantConfig(modality="Image").modality == "image"


@pytest.mark.parametrize("profile", [None, "edge", "local", "cloud"])
def test_to_dict_from_dict_round_trip(profile):
    kwargs = {} if profile is None else {"deployment_profile": profile}
    cfg = DiffusionQuantConfig(**kwargs, skip_patterns=["norm"], bit_overrides={"attn": 8, "ff": 16},
                               components=["unet"], modality="image", num_threads=2)
    d = cfg.to_dict()
    again = DiffusionQuantConfig.from_dict(d)
    assert again == cfg
    assert again.to_dict() == d
    # the dict is plain data: it survives JSON
    assert DiffusionQuantConfig.from_dict(json.loads(json.dumps(d))) == cfg


def test_to_dict_is_a_copy():
    cfg = DiffusionQuantConfig(bit_overrides={"attn": 8})
    d = cfg.to_dict()
    d["bit_overrides"]["attn"] = 2
    d["bit_width"] = 2
    assert cfg.bit_overrides == {"attn": 8}
    assert cfg.bit_width == 4


def test_quantize_rejects_a_config_that_is_not_a_diffusion_quant_config(tmp_path):
    with pytest.raises(ConfigurationError, match="config"):
        ArrowQuantV2().quantize({"w": np.zeros((4, 4), np.float32)}, config={"bit_width": 4})


def test_a_pattern_the_engine_cannot_compile_is_rejected_when_it_is_written():
    # The engine compiles patterns as ECMAScript regular expressions (std::regex); Python's `re`
    # accepts inline flags and named groups that ECMAScript does not. The config promises that "a
    # wrong value fails where it is written", so such a pattern must be refused at construction,
    # not later in the middle of quantize_diffusion_model.
    with pytest.raises(ConfigurationError, match="skip_patterns"):
        DiffusionQuantConfig(skip_patterns=["(?i)norm"])
