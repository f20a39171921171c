"""ByteModelConfig: the single source of truth for a StellarByte model's shape."""

from typing import Literal

from transformers import PretrainedConfig

from .compat import SEED_NAMES

ROPE_TYPES = ("default", "dynamic")
LLAMA_FAMILY = ("stellarbyte", "llama", "mixtral")  # model types whose weights and shapes ByteModel shares
# Fields that Llama and Mixtral configs take under the same names and meaning.
EXPORTED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "attention_dropout",
                   "hidden_act", "initializer_range", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id")


class ByteModelConfig(PretrainedConfig):
    """Llama-compatible configuration plus StellarByte's optional features.

    Field names are Hugging Face's, so a dense config reads like a `LlamaConfig`. RoPE follows transformers 5:
    `rope_parameters = {"rope_type": "default" | "dynamic", "rope_theta": ..., "factor": ...}`; the legacy
    `rope_theta=` and `rope_scaling=` keyword arguments are still accepted and folded into it.
    The seed project's names (`model_dim`, `num_layers`, ...) work as aliases through `attribute_map`
    (model/compat.py).
    """

    model_type = "stellarbyte"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = SEED_NAMES

    vocab_size: int = 6400
    hidden_size: int = 512
    intermediate_size: int | None = None
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 1024
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    # Sliding-window attention as Mistral defines it: a token sees itself and the sliding_window - 1 tokens before it.
    # layer_types names each layer "sliding_attention" or "full_attention" (transformers' names; None: every layer
    # slides when a window is set, else none). The KV cache of a sliding layer holds the window only.
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    # Features Llama lacks; all off by default so a dense model stays a valid Llama checkpoint.
    parallel_residual: bool = False
    layer_scale_init: float | None = None
    drop_path_rate: float = 0.0
    # Mixture of Experts (model/moe.py), off while num_experts is 0. Names follow transformers' MoE configs.
    num_experts: int = 0  # routed experts per MoE layer
    num_experts_per_tok: int = 2  # top k
    moe_intermediate_size: int | None = None  # each expert's inner size; None: intermediate_size
    num_shared_experts: int = 0  # experts every token goes through, beside the routed ones
    decoder_sparse_step: int = 1  # layer i is MoE when (i + 1) % step == 0; 1: every layer
    moe_capacity_factor: float | None = None  # None: dropless; else capacity per expert while training
    scoring_func: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum to 1
    router_aux_loss_coef: float = 0.01  # load-balancing loss weight
    router_z_loss_coef: float = 0.0  # router z-loss weight (ST-MoE uses 1e-3)
    router_bias_update_rate: float = 0.0  # > 0: auxiliary-loss-free balancing bias, updated every optimizer step

    def __post_init__(self, **kwargs):
        # Aliases passed as keyword arguments must land before the derived sizes below are computed.
        aliases = {key: kwargs.pop(key) for key in list(kwargs) if key in self.attribute_map or key == "moe_enabled"}
        for name, value in self.canonical_names(aliases, self.num_experts).items():
            setattr(self, name, value)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            # SwiGLU with ~8/3 expansion keeps the parameter count of a 4x GELU MLP; round up to 64 for fast matmuls.
            self.intermediate_size = 64 * ((8 * self.hidden_size // 3 + 63) // 64)
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.layer_types is None and isinstance(self.num_hidden_layers, int):
            # Spelled out, as transformers' configs do: its masks and caches read one type per layer.
            kind = "full_attention" if self.sliding_window is None else "sliding_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def to_llama_config(self):
        """The transformers `LlamaConfig` of the same dense architecture (features Llama lacks are not carried:
        callers that export must refuse models using them)."""
        from transformers import LlamaConfig

        fields = EXPORTED_FIELDS + ("intermediate_size", "attention_bias", "mlp_bias")
        return LlamaConfig(**{name: getattr(self, name) for name in fields}, rope_parameters=self.exported_rope())

    def to_mistral_config(self):
        """The transformers `MistralConfig` of the same dense sliding-window architecture (every layer sliding)."""
        from transformers import MistralConfig

        fields = EXPORTED_FIELDS + ("intermediate_size", "sliding_window")
        return MistralConfig(**{name: getattr(self, name) for name in fields}, rope_parameters=self.exported_rope())

    def to_mixtral_config(self):
        """The transformers `MixtralConfig` of the same MoE architecture: every layer MoE, softmax router with
        renormalised top-k, no shared experts (callers that export must refuse anything else)."""
        from transformers import MixtralConfig

        fields = EXPORTED_FIELDS + ("num_experts_per_tok", "router_aux_loss_coef")
        return MixtralConfig(**{name: getattr(self, name) for name in fields}, rope_parameters=self.exported_rope(),
                             intermediate_size=self.moe_intermediate_size, num_local_experts=self.num_experts,
                             sliding_window=self.sliding_window)

    @classmethod
    def from_llama_family(cls, config: PretrainedConfig) -> "ByteModelConfig":
        """The ByteModelConfig of the same shapes as a transformers Llama or Mixtral config (the inverse of
        to_llama_config and to_mixtral_config), for code that reads shapes only, such as FLOP counting. RoPE
        variants are not carried: they change no shape."""
        if isinstance(config, cls):
            return config
        if config.model_type not in LLAMA_FAMILY:
            raise ValueError(f"a {config.model_type!r} model; the trainer takes {', '.join(LLAMA_FAMILY)} models")
        fields = {name: getattr(config, name) for name in EXPORTED_FIELDS + ("intermediate_size",)
                  if getattr(config, name, None) is not None}
        if config.model_type == "mixtral":
            fields.update(num_experts=config.num_local_experts, num_experts_per_tok=config.num_experts_per_tok,
                          moe_intermediate_size=config.intermediate_size)
        return cls(**fields)

    def exported_rope(self) -> dict:
        # rope_theta written out in full: a missing one would otherwise take the target config's default.
        return {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_parameters or {})}

    @classmethod
    def canonical_names(cls, values: dict, num_experts: int = 0) -> dict:
        """`values` with the seed project's names replaced by the canonical ones, and its `moe_enabled` switch
        applied to `num_experts` (whose current value, when `values` lacks it, is `num_experts`). Shared by the
        constructor and the YAML model section, so both accept the same names."""
        values = dict(values)
        for alias, name in cls.attribute_map.items():
            if alias in values:
                if name in values and values[name] != values[alias]:
                    raise ValueError(f"{alias} and {name} name the same field: give one of them")
                values[name] = values.pop(alias)
        if "moe_enabled" in values:
            enabled = values.pop("moe_enabled")
            if not enabled:
                values["num_experts"] = 0
            elif not values.get("num_experts", num_experts):
                raise ValueError("moe_enabled needs moe_num_experts (num_experts) > 0")
        return values

    @property
    def moe_enabled(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.num_experts > 0 and (layer_idx + 1) % self.decoder_sparse_step == 0

    @property
    def rope_theta(self) -> float:
        return (self.rope_parameters or {}).get("rope_theta", self.default_theta)

    def validate_architecture(self) -> None:
        """Raise ValueError naming the first field whose value cannot build a model."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not divisible by "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        self.validate_moe()
        self.validate_sliding_window()
        rope = self.rope_parameters or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_parameters.rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
        if rope.get("rope_theta", self.default_theta) <= 0:
            raise ValueError(f"rope_parameters.rope_theta must be positive, got {rope.get('rope_theta')!r}")
        if rope_type == "dynamic" and not (isinstance(rope.get("factor"), (int, float)) and rope["factor"] >= 1.0):
            raise ValueError(f"rope_parameters.factor must be a number >= 1 for dynamic RoPE, got {rope.get('factor')!r}")

    def validate_sliding_window(self) -> None:
        window = self.sliding_window
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
            raise ValueError(f"sliding_window must be null or a positive integer, got {window!r}")
        kinds = ("sliding_attention", "full_attention")
        if not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers \
                or any(kind not in kinds for kind in self.layer_types):
            raise ValueError(f"layer_types must list {' or '.join(kinds)} for each of the {self.num_hidden_layers} "
                             f"layers, got {self.layer_types!r}")
        if window is None and "sliding_attention" in self.layer_types:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is null")
        if window is not None and (self.rope_parameters or {}).get("rope_type") == "dynamic":
            raise ValueError("sliding_window with dynamic RoPE is not supported (dynamic RoPE caches keys "
                             "un-rotated for every position, a sliding cache drops them)")

    def validate_moe(self) -> None:
        if not isinstance(self.num_experts, int) or isinstance(self.num_experts, bool) or self.num_experts < 0:
            raise ValueError(f"num_experts must be a non-negative integer, got {self.num_experts!r}")
        if not self.num_experts:
            return
        if not (isinstance(self.num_experts_per_tok, int) and 1 <= self.num_experts_per_tok <= self.num_experts):
            raise ValueError(f"num_experts_per_tok must be an integer in [1, num_experts={self.num_experts}], "
                             f"got {self.num_experts_per_tok!r}")
        for name, low in (("moe_intermediate_size", 1), ("num_shared_experts", 0), ("decoder_sparse_step", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.decoder_sparse_step > self.num_hidden_layers:
            raise ValueError(f"decoder_sparse_step={self.decoder_sparse_step} leaves no MoE layer among "
                             f"{self.num_hidden_layers} layers")
        if self.moe_capacity_factor is not None and not (isinstance(self.moe_capacity_factor, (int, float))
                                                         and self.moe_capacity_factor > 0):
            raise ValueError(f"moe_capacity_factor must be null or a positive number, got {self.moe_capacity_factor!r}")
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {self.scoring_func!r}")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_bias_update_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
