"""model/compat.py: the version shims pick what the installed torch and transformers offer."""

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from helpers import tiny_config
from model import ByteModel, CACHE_FIELD, enable_activation_checkpointing
from model.compat import GROUPED_MM


def test_cache_field_is_the_installed_output_field():
    assert CACHE_FIELD in CausalLMOutputWithPast.__dataclass_fields__
    output = ByteModel(tiny_config()).eval()(torch.zeros(1, 3, dtype=torch.long), use_cache=True)
    assert getattr(output, CACHE_FIELD).get_seq_length() == 3


def test_grouped_mm_is_torchs_own_where_it_exists():
    expected = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    assert GROUPED_MM is expected


def test_activation_checkpointing_through_either_name():
    model = ByteModel(tiny_config())
    enable_activation_checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)

    class OlderModel:  # a transformers that only knows the older name
        def __init__(self):
            self.calls = []

        def gradient_checkpointing_enable(self):
            self.calls.append("gradient_checkpointing_enable")

    older = OlderModel()
    enable_activation_checkpointing(older)
    assert older.calls == ["gradient_checkpointing_enable"]


def test_seed_names_are_the_configs_aliases():
    from model import ByteModelConfig
    from model.compat import SEED_NAMES

    assert ByteModelConfig.attribute_map is SEED_NAMES
    config = ByteModelConfig(num_heads=4, num_kv_heads=2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2) and config.model_dim == config.hidden_size
