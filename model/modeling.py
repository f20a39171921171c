"""ByteModel: the decoder-only language model assembled from the components in this package."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, MoeCausalLMOutputWithPast

from .attention import ByteAttention
from .compat import CACHE_FIELD
from .config import ByteModelConfig
from .decoder_layer import ByteDecoderLayer, ByteLayerScale
from .mlp import ByteMLP
from .moe import ByteExperts, ByteMoELayer, ByteRouter
from .norm import ByteRMSNorm
from .rope import ByteDynamicRoPE, DynamicRoPEInputs


def check_attention_mask(attention_mask: torch.Tensor | None, past_length: int, query_length: int) -> None:
    """A 2D mask must cover the cached tokens and the input: a shorter one would silently drop positions."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 \
            and attention_mask.shape[-1] < past_length + query_length:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, but the cache and input "
                         f"hold {past_length + query_length}: pass the mask of the whole sequence")


def count_targets(labels: torch.Tensor | None, shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Label tokens a causal LM loss counts (not -100): `shift_labels` when given, else `labels` after the shift
    that forward applies to them."""
    targets = shift_labels if shift_labels is not None else labels[:, 1:]
    return targets.ne(-100).sum()


@dataclass
class ByteMoeCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """transformers' MoE output plus the router z-loss. `aux_loss` and `z_loss` are means over the MoE layers,
    unweighted; `loss` includes them with their config coefficients while training."""

    z_loss: torch.FloatTensor | None = None


class BytePreTrainedModel(PreTrainedModel):
    config_class = ByteModelConfig
    config: ByteModelConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ByteDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save, with `AutoModel` named in the folder's auto_map beside the saved class: serving engines
        that run a custom model through transformers (vLLM's and SGLang's Transformers backends) load its base model
        with AutoModel."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": "modeling.ByteBaseModel"}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, ByteAttention):
            # GPT-2 / nanoGPT: the projections that write into the residual stream are scaled by 1/sqrt(2 * layers),
            # so the stream's variance does not grow with depth at initialisation.
            init.normal_(module.o_proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))
        elif isinstance(module, ByteMLP):
            init.normal_(module.down_proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))
        elif isinstance(module, ByteExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))
        elif isinstance(module, ByteRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.expert_bias)
        elif isinstance(module, ByteLayerScale):
            init.constant_(module.gamma, module.init_value)
        elif isinstance(module, ByteDynamicRoPE):
            # Non-persistent buffer: rebuilt here because from_pretrained creates modules on the meta device.
            init.copy_(module.inv_freq, module.compute_inv_freq(device=module.inv_freq.device))


class ByteBaseModel(BytePreTrainedModel):
    """Embeddings, decoder layers and the final norm; returns hidden states (the `AutoModel` class)."""

    def __init__(self, config: ByteModelConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        # Stochastic depth grows linearly with depth (plain Python, so the model can be built on the meta device).
        last = max(1, config.num_hidden_layers - 1)
        drop_paths = [config.drop_path_rate * index / last for index in range(config.num_hidden_layers)]
        self.layers = nn.ModuleList(
            ByteDecoderLayer(config, layer_idx, drop_paths[layer_idx]) for layer_idx in range(config.num_hidden_layers)
        )
        self.norm = ByteRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = ByteDynamicRoPE(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        past_key_values = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache is None:
            # A cache only helps generation: training would pay for storing every layer's keys and values.
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)

        query_length = inputs_embeds.shape[1]
        # A paged cache (continuous batching) passes positions and masks of its own and has no sequence length.
        paged = past_key_values is not None and not isinstance(past_key_values, Cache)
        past_length = past_key_values.get_seq_length() if past_key_values is not None and not paged else 0
        check_attention_mask(attention_mask, past_length, query_length)
        if position_ids is None:
            if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
                # Left padding shifts where each row starts: count real tokens, as `generate` does.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                position_ids = position_ids[:, past_length:past_length + query_length]
            else:
                position_ids = torch.arange(past_length, past_length + query_length,
                                            device=inputs_embeds.device)[None]
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        dynamic_rope = None
        if self.rotary_emb.rope_type == "dynamic":
            key_positions = position_ids
            if past_key_values is not None:
                kv_length = past_key_values.get_mask_sizes(query_length, 0)[0]
                # Cached keys sit at cache index i; a row's left padding shifts its positions by the gap between the
                # last token's index and its position.
                padding = (past_length + query_length - 1) - position_ids[:, -1:]
                key_positions = (torch.arange(kv_length, device=position_ids.device)[None] - padding).clamp(min=0)
            dynamic_rope = DynamicRoPEInputs.build(self.rotary_emb, inputs_embeds, position_ids, key_positions)
        mask_inputs = dict(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           cache=past_key_values, position_ids=position_ids)
        # generate prepares masks per layer type for a static cache; otherwise they are made here.
        masks = attention_mask if isinstance(attention_mask, dict) else {
            kind: make_mask(**mask_inputs) for kind, make_mask in (
                ("full_attention", create_causal_mask), ("sliding_attention", create_sliding_window_causal_mask))
            if kind in self.config.layer_types}

        hidden_states = inputs_embeds
        all_hidden_states = [hidden_states] if output_hidden_states else None
        for layer, layer_type in zip(self.layers, self.config.layer_types):
            hidden_states = layer(hidden_states, position_embeddings, attention_mask=masks[layer_type],
                                  cache=past_key_values, dynamic_rope=dynamic_rope, position_ids=position_ids,
                                  **kwargs)
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            # Like transformers: the last entry is the normed output.
            all_hidden_states[-1] = hidden_states
        return BaseModelOutputWithPast(last_hidden_state=hidden_states,
                                       hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
                                       **{CACHE_FIELD: past_key_values if use_cache else None})


class ByteModel(BytePreTrainedModel, GenerationMixin):
    """Causal language model: `ByteBaseModel` plus the LM head. Parameter names are Llama's, so a dense checkpoint
    loads as `LlamaForCausalLM` too."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ByteModelConfig):
        super().__init__(config)
        self.model = ByteBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        shift_labels: torch.LongTensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`labels` are aligned with `input_ids` and shifted here; -100 is ignored. `shift_labels` (transformers'
        name) are targets already shifted, position t holding the token after t: packed pretraining windows use
        them so that every input position is trained. `num_items_in_batch` (the count of non-ignored labels over
        all accumulated micro-batches) turns the mean into a sum over that count, so gradient accumulation weights
        every token equally. `logits_to_keep=n` computes logits of the last n only. `cache` is transformers 5.24's
        name for `past_key_values`."""
        outputs = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, cache=cache, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, output_hidden_states=output_hidden_states, **kwargs)
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor):  # positions to keep (continuous batching's last tokens)
            hidden_states = hidden_states[:, logits_to_keep]
        elif logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None or shift_labels is not None:
            loss = self.causal_lm_loss(logits, labels, num_items_in_batch, shift_labels)
        if not self.config.num_experts:
            return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                          **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)})

        # The layers' own MLP slots, not a walk over every module: this runs at every decoding step.
        stats = [layer.mlp.router_stats for layer in self.model.layers if isinstance(layer.mlp, ByteMoELayer)]
        aux_loss = z_loss = None
        if all(stat is not None for stat in stats):
            aux_loss = torch.stack([stat.aux_loss for stat in stats]).mean()
            z_loss = torch.stack([stat.z_loss for stat in stats]).mean()
        if loss is not None and self.training:
            # Balancing terms are training objectives only: evaluation loss stays comparable with dense models.
            weight = 1.0
            if num_items_in_batch is not None:
                # This micro-batch's share of the step's targets, as its language-model loss is weighted.
                weight = count_targets(labels, shift_labels) / num_items_in_batch
            loss = loss + weight * (self.config.router_aux_loss_coef * aux_loss
                                    + self.config.router_z_loss_coef * z_loss)
        return ByteMoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, z_loss=z_loss, logits=logits,
                                             hidden_states=outputs.hidden_states,
                                             **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)})

    def _valid_auto_compile_criteria(self, model_kwargs: dict, generation_config) -> bool:
        """`generate` with a static cache (`cache_implementation="static"`) runs a compiled one-token decode step.
        transformers does that on accelerators only; on a CPU it pays as well (measured with scripts/benchmark.py),
        so ByteModel compiles there too, after a one-off compile. `disable_compile=True` keeps it eager."""
        if self.config.num_experts or self.model.rotary_emb.rope_type == "dynamic":
            return False  # data-dependent code (expert dispatch, per-length RoPE): compiling costs more than it saves
        if self.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            return False  # bf16 decoding compiled on a CPU measured slower than eager, and rounds differently
        if self.device.type == "cpu" and not generation_config.disable_compile:
            cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
            return bool(getattr(cache, "is_compileable", False)) and not isinstance(cache, DynamicCache)
        return super()._valid_auto_compile_criteria(model_kwargs, generation_config)

    def init_continuous_batching(self, *args, **kwargs):
        """transformers' continuous batching (`generate_batch` too). Its paged cache holds rotated keys, which dynamic
        NTK RoPE cannot use (it keeps keys un-rotated and rotates them for each length)."""
        if self.model.rotary_emb.rope_type == "dynamic":
            raise ValueError("continuous batching needs a model without dynamic NTK RoPE (its keys are cached "
                             "un-rotated, a paged cache holds rotated ones): use generate")
        return super().init_continuous_batching(*args, **kwargs)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs) -> None:
        """Every way of switching checkpointing on (`activation_checkpointing_enable`, the older
        `gradient_checkpointing_enable`, `transformers.Trainer`) ends here, so the MoE check lives here."""
        use_reentrant = getattr(gradient_checkpointing_func, "keywords", {}).get("use_reentrant")
        if enable and self.config.num_experts and use_reentrant:
            # Reentrant checkpointing runs layers under no_grad; the balancing losses the MoE layers leave for
            # forward() would then carry no gradient.
            raise ValueError("MoE models need non-reentrant gradient checkpointing (use_reentrant=False, the default)")
        if gradient_checkpointing_func is not None:
            kwargs["gradient_checkpointing_func"] = gradient_checkpointing_func
        super()._set_gradient_checkpointing(enable=enable, **kwargs)

    @staticmethod
    def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor | None,
                       num_items_in_batch: int | torch.Tensor | None = None,
                       shift_labels: torch.Tensor | None = None) -> torch.Tensor:
        if shift_labels is None:
            # Shift the labels rather than the logits: the logits stay contiguous, so no (tokens x vocab) copy.
            shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
        shift_labels = shift_labels.to(logits.device)
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = F.cross_entropy(logits.flatten(0, 1).float(), shift_labels.flatten(), ignore_index=-100,
                               reduction=reduction)
        return loss if num_items_in_batch is None else loss / num_items_in_batch
