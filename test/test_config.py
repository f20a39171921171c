"""ByteModelConfig: derived defaults, seed aliases, legacy RoPE kwargs, validation, serialisation, Auto registration."""

import json

import pytest
from transformers import AutoConfig

import model  # noqa: F401  (registers "stellarbyte" with the Auto classes)
from model import ByteModelConfig
from helpers import tiny_config


# ----------------------------------------------------------------------------------------------- derived defaults
def test_defaults_are_derived():
    config = ByteModelConfig()
    assert config.model_type == "stellarbyte"
    assert config.head_dim == config.hidden_size // config.num_attention_heads == 64
    assert config.num_key_value_heads == config.num_attention_heads
    assert config.intermediate_size % 64 == 0
    assert config.intermediate_size == 1408  # 8 * 512 / 3 = 1365.3, rounded up to a multiple of 64
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert config.rope_theta == 10000.0
    assert (config.parallel_residual, config.layer_scale_init, config.drop_path_rate) == (False, None, 0.0)


@pytest.mark.parametrize("hidden_size, expected", [(64, 192), (96, 256), (128, 384), (256, 704), (768, 2048)])
def test_intermediate_size_is_multiple_of_64_above_8_thirds(hidden_size, expected):
    config = ByteModelConfig(hidden_size=hidden_size, num_attention_heads=4)
    assert config.intermediate_size == expected
    assert config.intermediate_size % 64 == 0
    assert 8 * hidden_size / 3 <= config.intermediate_size < 8 * hidden_size / 3 + 64


def test_explicit_sizes_are_kept():
    config = ByteModelConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, intermediate_size=100,
                             head_dim=32)
    assert (config.num_key_value_heads, config.intermediate_size, config.head_dim) == (1, 100, 32)


# ------------------------------------------------------------------------------------------------------- aliases
ALIASES = {"model_dim": ("hidden_size", 128), "num_layers": ("num_hidden_layers", 3),
           "hidden_dim": ("intermediate_size", 320), "num_heads": ("num_attention_heads", 8),
           "num_kv_heads": ("num_key_value_heads", 2), "max_seq_len": ("max_position_embeddings", 77),
           "norm_eps": ("rms_norm_eps", 1e-5)}


def test_seed_aliases_as_kwargs_and_attributes():
    config = ByteModelConfig(**{alias: value for alias, (_, value) in ALIASES.items()})
    for alias, (field, value) in ALIASES.items():
        assert getattr(config, field) == value, field
        assert getattr(config, alias) == value, alias
    # Derived sizes use the aliased values, not the class defaults.
    assert config.head_dim == 128 // 8
    # Aliases are not serialised; the canonical names are.
    as_dict = config.to_dict()
    assert as_dict["hidden_size"] == 128 and "model_dim" not in as_dict


def test_alias_attribute_assignment_writes_the_canonical_field():
    config = tiny_config()
    config.num_layers = 5
    config.model_dim = 96
    assert config.num_hidden_layers == 5 and config.hidden_size == 96


def test_alias_drives_derived_intermediate_size():
    assert ByteModelConfig(model_dim=64, num_heads=4).intermediate_size == 192


# -------------------------------------------------------------------------------------------------- legacy rope
def test_legacy_rope_theta_kwarg():
    config = tiny_config(rope_theta=500000.0)
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert config.rope_parameters["rope_type"] == "default"
    assert config.rope_theta == 500000.0


def test_legacy_rope_scaling_kwarg():
    config = tiny_config(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, rope_theta=1234.0)
    assert config.rope_parameters["rope_type"] == "dynamic"
    assert config.rope_parameters["factor"] == 2.0
    assert config.rope_parameters["rope_theta"] == 1234.0


def test_legacy_rope_scaling_with_old_type_key():
    config = tiny_config(rope_scaling={"type": "dynamic", "factor": 3.0})
    assert config.rope_parameters["rope_type"] == "dynamic"
    assert config.rope_parameters["factor"] == 3.0
    assert config.rope_parameters["rope_theta"] == 10000.0


# --------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, fragments", [
    (dict(hidden_size=100, num_attention_heads=8), ["hidden_size", "100", "num_attention_heads", "8"]),
    (dict(hidden_size=64, num_attention_heads=6, head_dim=16), ["hidden_size", "64", "num_attention_heads", "6"]),
    (dict(num_attention_heads=4, num_key_value_heads=3), ["num_key_value_heads", "3"]),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}), ["rope_type", "yarn"]),
    (dict(vocab_size=0), ["vocab_size", "0"]),
    (dict(num_hidden_layers=-1), ["num_hidden_layers", "-1"]),
    (dict(hidden_size=0), ["hidden_size", "0"]),
    (dict(max_position_embeddings=0), ["max_position_embeddings", "0"]),
    (dict(intermediate_size=-64), ["intermediate_size", "-64"]),
    (dict(num_key_value_heads=0), ["num_key_value_heads", "0"]),
    (dict(vocab_size=12.5), ["vocab_size", "12.5"]),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0}), ["factor", "None"]),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 0.5, "rope_theta": 10000.0}), ["factor", "0.5"]),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": -1.0}), ["rope_theta", "-1.0"]),
    (dict(rms_norm_eps=0.0), ["rms_norm_eps", "0.0"]),
    (dict(drop_path_rate=1.0), ["drop_path_rate", "1.0"]),
    (dict(attention_dropout=-0.1), ["attention_dropout", "-0.1"]),
    (dict(hidden_act="gelu"), ["hidden_act", "gelu"]),
])
def test_invalid_config_raises_value_error_naming_field_and_value(kwargs, fragments):
    with pytest.raises(ValueError) as excinfo:
        tiny_config(**kwargs)
    message = str(excinfo.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_dynamic_rope_with_factor_one_is_valid():
    config = tiny_config(rope_parameters={"rope_type": "dynamic", "factor": 1.0, "rope_theta": 10000.0})
    assert config.rope_parameters["factor"] == 1.0


# ---------------------------------------------------------------------------------------------- serialisation
def test_to_dict_and_save_load_round_trip(tmp_path):
    config = tiny_config(parallel_residual=True, layer_scale_init=1e-3, drop_path_rate=0.1, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5000.0},
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    as_dict = config.to_dict()
    assert as_dict["model_type"] == "stellarbyte"
    assert as_dict["parallel_residual"] is True and as_dict["layer_scale_init"] == 1e-3
    assert ByteModelConfig.from_dict(as_dict).to_dict() == as_dict

    config.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["model_type"] == "stellarbyte"
    assert on_disk["hidden_size"] == 64 and on_disk["num_key_value_heads"] == 2
    # The class is registered for AutoConfig: its code goes beside config.json (loadable without this project).
    assert on_disk["auto_map"] == {"AutoConfig": "config.ByteModelConfig"} and (tmp_path / "config.py").is_file()
    loaded = ByteModelConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ByteModelConfig)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
                "parallel_residual", "layer_scale_init", "drop_path_rate", "tie_word_embeddings", "pad_token_id",
                "bos_token_id", "eos_token_id"):
        assert getattr(loaded, key) == getattr(config, key), key
    strip = lambda d: {k: v for k, v in d.items() if k not in ("_name_or_path", "transformers_version", "auto_map")}
    assert strip(loaded.to_dict()) == strip(as_dict)


def test_auto_config_from_pretrained(tmp_path):
    tiny_config(num_hidden_layers=3).save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is ByteModelConfig
    assert loaded.num_hidden_layers == 3 and loaded.hidden_size == 64
    assert type(AutoConfig.for_model("stellarbyte", hidden_size=64, num_attention_heads=4)) is ByteModelConfig
