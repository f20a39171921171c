"""ByteModel / ByteBaseModel against transformers' LlamaForCausalLM: logits, loss, gradients, caching, generation,
padding, tied embeddings, serialisation and Auto classes, gradient checkpointing, dynamic RoPE."""

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, LlamaForCausalLM
from transformers.cache_utils import DynamicCache, StaticCache

from helpers import ATOL, GRAD_TOL, llama_config_from, randomize_, tiny_config
from model import CACHE_FIELD, ByteBaseModel, ByteModel, ByteModelConfig

VOCAB = 128
GEN = dict(do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0)


def make_pair(impl: str = "sdpa", **overrides):
    """A randomised ByteModel and a LlamaForCausalLM holding the same weights (loaded strictly)."""
    torch.manual_seed(0)
    config = tiny_config(pad_token_id=0, **overrides)
    byte = randomize_(ByteModel(config)).eval()
    llama = LlamaForCausalLM(llama_config_from(config, impl)).eval()
    llama.load_state_dict(byte.state_dict(), strict=True)
    return byte, llama


@pytest.fixture(scope="module")
def pair():
    return make_pair()


def random_ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=generator)


def left_pad(ids: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the last `lengths[i]` tokens of row i, left-padding the rest with id 0."""
    ids = ids.clone()
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :ids.shape[1] - length] = 0
        mask[row, :ids.shape[1] - length] = 0
    return ids, mask


# ------------------------------------------------------------------------------------------------ structure
def test_state_dict_keys_equal_llama(pair):
    byte, llama = pair
    assert list(byte.state_dict()) == list(llama.state_dict())
    for key, value in llama.state_dict().items():
        assert byte.state_dict()[key].shape == value.shape, key


def test_sdpa_is_the_attention_implementation(pair):
    byte, _ = pair
    assert byte.config._attn_implementation == "sdpa"


# -------------------------------------------------------------------------------------------- logits and loss
# Besides the defaults, a norm epsilon and an MLP width of their own (they reach Llama through llama_config_from).
@pytest.mark.parametrize("overrides", [{}, {"rms_norm_eps": 0.1, "intermediate_size": 96}],
                         ids=["defaults", "eps-width"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_logits_and_loss_match_llama(impl, overrides):
    byte, llama = make_pair(impl, **overrides)
    ids = random_ids(2, 16)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 10:] = -100
    out_byte = byte(ids, labels=labels)
    out_llama = llama(ids, labels=labels)
    assert out_byte.logits.shape == (2, 16, VOCAB)
    torch.testing.assert_close(out_byte.logits, out_llama.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out_byte.loss, out_llama.loss, atol=ATOL, rtol=0)
    assert out_byte.loss.item() > 1.0  # random weights: a loss near log(128), not trivially 0


def test_initial_weights_follow_initializer_range():
    """Embeddings and linear weights are drawn with std initializer_range (test_moe checks the experts and the
    router)."""
    torch.manual_seed(0)
    byte = ByteModel(tiny_config(hidden_size=128, initializer_range=0.05))
    layer = byte.model.layers[1]
    for weight in (byte.model.embed_tokens.weight, layer.self_attn.q_proj.weight, layer.mlp.up_proj.weight,
                   byte.lm_head.weight):
        assert weight.std().item() == pytest.approx(0.05, rel=0.05)


def test_loss_is_hand_computed_shifted_cross_entropy(pair):
    byte, _ = pair
    ids = random_ids(3, 9, seed=2)
    labels = ids.clone()
    labels[0, 2:5] = -100
    labels[2, 0] = -100
    out = byte(ids, labels=labels)
    terms = []
    log_probs = out.logits.double().log_softmax(-1)
    for b in range(3):
        for t in range(8):  # position t predicts label t + 1; the last position has no target
            if labels[b, t + 1] != -100:
                terms.append(-log_probs[b, t, labels[b, t + 1]])
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(out.loss.double(), expected, atol=ATOL, rtol=0)
    # Pure-ignore batch: nan (mean of nothing), as in torch's cross_entropy.
    assert torch.isnan(byte(ids, labels=torch.full_like(ids, -100)).loss)


@pytest.mark.slow
def test_num_items_in_batch_gives_sum_over_count(pair):
    byte, llama = pair
    ids = random_ids(2, 10, seed=3)
    labels = ids.clone()
    labels[1, :6] = -100
    n_valid = int((labels[:, 1:] != -100).sum())
    mean_loss = byte(ids, labels=labels).loss
    for num_items in (n_valid, 37, torch.tensor(37)):
        loss = byte(ids, labels=labels, num_items_in_batch=num_items).loss
        torch.testing.assert_close(loss, mean_loss * n_valid / int(num_items), atol=ATOL, rtol=0)
        torch.testing.assert_close(loss, llama(ids, labels=labels, num_items_in_batch=num_items).loss,
                                   atol=ATOL, rtol=0)


@pytest.mark.slow
def test_gradients_match_llama():
    byte, llama = make_pair()
    byte.train()
    llama.train()
    ids = random_ids(2, 12, seed=4)
    labels = ids.clone()
    labels[0, :3] = -100
    byte(ids, labels=labels).loss.backward()
    llama(ids, labels=labels).loss.backward()
    llama_params = dict(llama.named_parameters())
    names = [name for name, _ in byte.named_parameters()]
    assert names == list(llama_params)
    for name, param in byte.named_parameters():
        assert param.grad is not None and param.grad.abs().max() > 0, name
        torch.testing.assert_close(param.grad, llama_params[name].grad, **GRAD_TOL, msg=name)


@pytest.mark.slow
def test_logits_to_keep_and_inputs_embeds(pair):
    byte, _ = pair
    ids = random_ids(2, 8, seed=5)
    full = byte(ids).logits
    torch.testing.assert_close(byte(ids, logits_to_keep=3).logits, full[:, -3:], atol=ATOL, rtol=0)
    embeds = byte.get_input_embeddings()(ids)
    torch.testing.assert_close(byte(inputs_embeds=embeds).logits, full, atol=ATOL, rtol=0)
    with pytest.raises(ValueError):
        byte(ids, inputs_embeds=embeds)
    with pytest.raises(ValueError):
        byte()


# ----------------------------------------------------------------------------------------------- KV cache
@pytest.mark.slow
@pytest.mark.parametrize("num_kv", [2, 4])
def test_kv_cache_decoding_matches_full_forward(num_kv):
    byte, llama = make_pair(num_key_value_heads=num_kv)
    ids = random_ids(2, 14, seed=6)
    full = byte(ids, use_cache=False).logits
    assert getattr(byte(ids, use_cache=False), CACHE_FIELD) is None
    cache = DynamicCache(config=byte.config)
    out = byte(ids[:, :5], past_key_values=cache, use_cache=True)
    assert getattr(out, CACHE_FIELD) is cache and cache.get_seq_length() == 5
    steps = [out.logits]
    for t in range(5, 14):
        out = byte(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
    assert cache.get_seq_length() == 14
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
    torch.testing.assert_close(full, llama(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_decoding_matches_full_forward(pair, padded):
    byte, _ = pair
    ids = random_ids(2, 10, seed=24)
    mask = None
    if padded:
        ids, mask = left_pad(ids, [6, 10])
    full = byte(ids, attention_mask=mask, use_cache=False).logits
    cache = StaticCache(config=byte.config, max_cache_len=16)  # longer than the sequence: unwritten slots exist
    prefix_mask = None if mask is None else mask[:, :5]
    steps = [byte(ids[:, :5], attention_mask=prefix_mask, past_key_values=cache, use_cache=True).logits]
    for t in range(5, 10):
        step_mask = None if mask is None else mask[:, :t + 1]
        steps.append(byte(ids[:, t:t + 1], attention_mask=step_mask, past_key_values=cache, use_cache=True).logits)
    assert int(cache.get_seq_length()) == 10
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], atol=ATOL, rtol=0)


def test_default_cache_in_eval_none_in_train(pair):
    byte, _ = pair
    ids = random_ids(1, 4)
    out = byte(ids)
    assert isinstance(getattr(out, CACHE_FIELD), DynamicCache) and getattr(out, CACHE_FIELD).get_seq_length() == 4
    byte.train()
    try:
        assert getattr(byte(ids), CACHE_FIELD) is None
    finally:
        byte.eval()


# ---------------------------------------------------------------------------------------------- generation
@pytest.mark.slow
@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_greedy_generate_matches_llama(pair, cache_implementation):
    byte, llama = pair
    ids = random_ids(2, 6, seed=7)
    kwargs = dict(GEN, return_dict_in_generate=True, output_logits=True)
    if cache_implementation:
        kwargs["cache_implementation"] = cache_implementation
    out_byte, out_llama = byte.generate(ids, **kwargs), llama.generate(ids, **kwargs)
    assert out_byte.sequences.shape == (2, 6 + GEN["max_new_tokens"])
    assert torch.equal(out_byte.sequences, out_llama.sequences)
    assert len(set(out_byte.sequences[:, 6:].flatten().tolist())) > 3  # not a degenerate repetition
    for step_byte, step_llama in zip(out_byte.logits, out_llama.logits):
        torch.testing.assert_close(step_byte, step_llama, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_static_cache_generate_runs_a_compiled_decode_step_with_identical_tokens(pair):
    byte, _ = pair
    ids = random_ids(2, 6, seed=8)
    kwargs = dict(GEN, return_dict_in_generate=True, output_logits=True, cache_implementation="static")
    eager = byte.generate(ids, **kwargs, disable_compile=True)
    compiled = byte.generate(ids, **kwargs)
    assert getattr(byte, "_compiled_call", None) is not None  # transformers' compiled decode step was used
    assert torch.equal(compiled.sequences, eager.sequences)
    for step_compiled, step_eager in zip(compiled.logits, eager.logits):
        torch.testing.assert_close(step_compiled, step_eager, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_greedy_generate_equals_argmax_loop(pair):
    byte, _ = pair
    ids = random_ids(1, 5, seed=8)
    sequence = ids
    for _ in range(6):
        next_token = byte(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(byte.generate(ids, **dict(GEN, max_new_tokens=6)), sequence)


@pytest.mark.slow
@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_left_padded_generate_matches_rows_alone(pair, cache_implementation):
    byte, llama = pair
    lengths = [3, 7, 5]
    ids, mask = left_pad(random_ids(3, 7, seed=9), lengths)
    kwargs = dict(GEN, max_new_tokens=8)
    if cache_implementation:
        kwargs["cache_implementation"] = cache_implementation
    batched = byte.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(batched, llama.generate(ids, attention_mask=mask, **kwargs))
    for row, length in enumerate(lengths):
        alone = byte.generate(ids[row:row + 1, 7 - length:], **kwargs)
        assert torch.equal(batched[row, 7:], alone[0, length:]), row


def test_left_padded_forward_without_position_ids_matches_rows_alone(pair):
    byte, llama = pair
    lengths = [4, 9, 6]
    ids, mask = left_pad(random_ids(3, 9, seed=10), lengths)
    logits = byte(ids, attention_mask=mask).logits
    assert not torch.isnan(logits).any()
    for row, length in enumerate(lengths):
        alone = byte(ids[row:row + 1, 9 - length:]).logits
        torch.testing.assert_close(logits[row, 9 - length:], alone[0], atol=ATOL, rtol=0)
    # Llama needs explicit positions for left padding; given them, it agrees on real tokens.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    llama_logits = llama(ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], llama_logits[real], atol=ATOL, rtol=0)


def test_short_padded_mask_with_cache_raises_value_error(pair):
    byte, _ = pair
    ids = random_ids(1, 6, seed=20)
    cache = DynamicCache(config=byte.config)
    byte(ids[:, :5], attention_mask=torch.tensor([[0, 1, 1, 1, 1]]), past_key_values=cache)
    with pytest.raises(ValueError, match="pass the mask of the whole sequence"):
        # The mask still covers only the 5 cached positions, not the new one.
        byte(ids[:, 5:], attention_mask=torch.tensor([[0, 1, 1, 1, 1]]), past_key_values=cache)


def test_short_unpadded_mask_with_cache_raises_value_error(pair):
    byte, _ = pair
    ids = random_ids(1, 6, seed=21)
    cache = DynamicCache(config=byte.config)
    byte(ids[:, :5], past_key_values=cache)
    with pytest.raises(ValueError, match="pass the mask of the whole sequence"):
        byte(ids[:, 5:], attention_mask=torch.ones(1, 1, dtype=torch.long), past_key_values=cache)


def test_left_padding_positions_count_real_tokens(pair):
    byte, _ = pair
    captured = []
    handle = byte.model.rotary_emb.register_forward_hook(lambda module, args, out: captured.append(args[1].clone()))
    try:
        ids, mask = left_pad(random_ids(2, 6, seed=22), [3, 6])
        byte(ids, attention_mask=mask, use_cache=False)
    finally:
        handle.remove()
    assert captured[0][0, 3:].tolist() == [0, 1, 2] and captured[0][1].tolist() == [0, 1, 2, 3, 4, 5]


def test_dynamic_rope_left_padded_forward_matches_rows_alone():
    # RoPE is shift-invariant, but dynamic RoPE is not: positions must count real tokens only, or rows of 40 and 60
    # tokens padded to 70 would be treated as longer than max_position_embeddings=64 and get rescaled frequencies.
    byte, llama = make_pair(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    lengths = [40, 60]
    ids, mask = left_pad(random_ids(2, 70, seed=23), lengths)
    padded = byte(ids, attention_mask=mask, use_cache=False).logits
    for row, length in enumerate(lengths):
        alone = byte(ids[row:row + 1, 70 - length:], use_cache=False).logits[0]
        torch.testing.assert_close(padded[row, 70 - length:], alone, atol=ATOL, rtol=0)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    llama_logits = llama(ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(padded[real], llama_logits[real], atol=ATOL, rtol=0)


def test_right_padded_forward_matches_llama(pair):
    byte, llama = pair
    ids = random_ids(2, 8, seed=11)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    real = mask.bool()
    torch.testing.assert_close(byte(ids, attention_mask=mask).logits[real],
                               llama(ids, attention_mask=mask).logits[real], atol=ATOL, rtol=0)


def test_left_padded_cache_decoding_matches_full_forward(pair):
    byte, _ = pair
    ids, mask = left_pad(random_ids(2, 10, seed=12), [6, 10])
    full = byte(ids, attention_mask=mask, use_cache=False).logits
    cache = DynamicCache(config=byte.config)
    steps = [byte(ids[:, :4], attention_mask=mask[:, :4], past_key_values=cache, use_cache=True).logits]
    for t in range(4, 10):
        steps.append(byte(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                          use_cache=True).logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], atol=ATOL, rtol=0)


# -------------------------------------------------------------------------------------------- tied embeddings
def test_tied_embeddings_share_storage_and_survive_save_load(tmp_path):
    byte, llama = make_pair(tie_word_embeddings=True)
    assert byte.lm_head.weight.data_ptr() == byte.model.embed_tokens.weight.data_ptr()
    assert byte.lm_head.weight is byte.model.embed_tokens.weight
    ids = random_ids(2, 8, seed=13)
    torch.testing.assert_close(byte(ids).logits, llama(ids).logits, atol=ATOL, rtol=0)

    byte.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert "model.embed_tokens.weight" in saved
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is ByteModel and loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, byte.lm_head.weight)
    assert torch.equal(loaded(ids).logits, byte(ids).logits)
    # Training one updates the other.
    with torch.no_grad():
        loaded.model.embed_tokens.weight[3].add_(1.0)
    assert torch.equal(loaded.lm_head.weight[3], loaded.model.embed_tokens.weight[3])


def test_untied_embeddings_are_independent(pair):
    byte, _ = pair
    assert byte.lm_head.weight.data_ptr() != byte.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(byte.lm_head.weight, byte.model.embed_tokens.weight)


# ------------------------------------------------------------------------------------ serialisation and Auto
def test_save_pretrained_auto_round_trip_is_exact(pair, tmp_path):
    byte, _ = pair
    byte.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is ByteModel
    assert isinstance(loaded.config, ByteModelConfig) and loaded.config.model_type == "stellarbyte"
    original, restored = byte.state_dict(), loaded.state_dict()
    assert list(original) == list(restored)
    for key in original:
        assert restored[key].dtype == original[key].dtype == torch.float32, key
        assert torch.equal(restored[key], original[key]), key
    assert torch.equal(loaded.model.rotary_emb.inv_freq, byte.model.rotary_emb.inv_freq)
    ids = random_ids(2, 10, seed=14)
    assert torch.equal(loaded(ids).logits, byte(ids).logits)

    base = AutoModel.from_pretrained(tmp_path).eval()
    assert type(base) is ByteBaseModel
    for key, value in base.state_dict().items():
        assert torch.equal(value, original["model." + key]), key
    assert torch.equal(base(ids).last_hidden_state, byte.model(ids).last_hidden_state)


def test_new_layer_scale_parameters_are_initialised_when_loading_a_dense_checkpoint(pair, tmp_path):
    byte, _ = pair
    byte.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, layer_scale_init=1e-4)
    assert loaded.config.layer_scale_init == 1e-4
    for layer in loaded.model.layers:
        assert torch.all(layer.attn_layer_scale.gamma == 1e-4) and torch.all(layer.mlp_layer_scale.gamma == 1e-4)
    assert torch.equal(loaded.model.layers[0].mlp.down_proj.weight, byte.model.layers[0].mlp.down_proj.weight)


def test_auto_from_config():
    config = tiny_config()
    assert type(AutoModelForCausalLM.from_config(config)) is ByteModel
    assert type(AutoModel.from_config(config)) is ByteBaseModel


def test_saved_weights_load_into_llama_strictly(pair, tmp_path):
    byte, _ = pair
    byte.save_pretrained(tmp_path)
    state_dict = load_file(tmp_path / "model.safetensors")
    llama = LlamaForCausalLM(llama_config_from(byte.config)).eval()
    llama.load_state_dict(state_dict, strict=True)
    ids = random_ids(2, 10, seed=15)
    torch.testing.assert_close(llama(ids).logits, byte(ids).logits, atol=ATOL, rtol=0)


def test_saved_folder_loads_with_llama_from_pretrained_given_a_llama_config(pair, tmp_path):
    byte, _ = pair
    byte.save_pretrained(tmp_path)
    llama = LlamaForCausalLM.from_pretrained(tmp_path, config=llama_config_from(byte.config)).eval()
    for key, value in byte.state_dict().items():
        assert torch.equal(llama.state_dict()[key], value), key
    ids = random_ids(1, 10, seed=16)
    torch.testing.assert_close(llama(ids).logits, byte(ids).logits, atol=ATOL, rtol=0)


# -------------------------------------------------------------------------------------- gradient checkpointing
def test_gradient_checkpointing_gives_same_loss_and_gradients():
    byte, _ = make_pair()
    ids = random_ids(2, 12, seed=17)

    def loss_and_grads(model):
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    byte.train()
    loss_plain, grads_plain = loss_and_grads(byte)
    byte.activation_checkpointing_enable()
    assert byte.is_gradient_checkpointing and all(layer.gradient_checkpointing for layer in byte.model.layers)
    loss_ckpt, grads_ckpt = loss_and_grads(byte)
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=ATOL, rtol=0)
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], **GRAD_TOL, msg=name)
    byte.activation_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in byte.model.layers)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{}, {"num_experts": 4, "num_experts_per_tok": 2}], ids=["dense", "moe"])
def test_transformers_trainer_trains_with_gradient_checkpointing_and_reloads(tmp_path, overrides, monkeypatch):
    # transformers.Trainer switches checkpointing on through its own entry point (activation_checkpointing_enable
    # in 5.x, with keywords such as every_n_layers): the model must accept whatever the installed version passes.
    import transformers.trainer
    from transformers import Trainer, TrainingArguments

    # With the repository root on sys.path (as pytest puts it) the data folder datasets/ is a namespace package
    # that transformers mistakes for the `datasets` library when that is not installed; a user's script outside
    # the repository does not see it.
    monkeypatch.setattr(transformers.trainer, "is_datasets_available", lambda: False)

    torch.manual_seed(0)
    byte = ByteModel(tiny_config(pad_token_id=0, **overrides))
    ids = random_ids(16, 12, seed=31)
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    before = {name: p.detach().clone() for name, p in byte.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), gradient_checkpointing=True, max_steps=4,
                             per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=byte, args=args, train_dataset=dataset)
    result = trainer.train()
    assert result.global_step == 4 and math.isfinite(result.training_loss)
    assert all(layer.gradient_checkpointing for layer in byte.model.layers)
    changed = [name for name, p in byte.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed
    if overrides:
        assert "model.layers.0.mlp.gate.weight" in changed  # the router learns through the checkpointed layers
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    byte.eval()
    torch.testing.assert_close(reloaded(ids[:2]).logits, byte(ids[:2]).logits, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------- dynamic RoPE
DYNAMIC = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}


@pytest.mark.slow
def test_dynamic_rope_is_plain_within_max_positions_and_causal_beyond():
    byte, llama = make_pair(rope_parameters=DYNAMIC)
    default, _ = make_pair()  # same seed, same weights, plain RoPE
    ids = random_ids(1, 100, seed=100)
    logits = byte(ids, use_cache=False).logits
    # Within max_position_embeddings=64 it is plain RoPE, as in Llama ...
    torch.testing.assert_close(logits[:, :64], default(ids[:, :64], use_cache=False).logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[:, :64], llama(ids[:, :64], use_cache=False).logits, atol=ATOL, rtol=0)
    assert (logits[:, 64:] - default(ids, use_cache=False).logits[:, 64:]).abs().max() > 1e-3
    # ... and a prefix's logits never change when tokens follow (Llama rescales every position for the length).
    for length in (65, 80):
        torch.testing.assert_close(byte(ids[:, :length], use_cache=False).logits, logits[:, :length], atol=ATOL,
                                   rtol=0)
    assert (llama(ids, use_cache=False).logits[:, :64] - logits[:, :64]).abs().max() > 1e-3


def test_one_layer_dynamic_rope_matches_llama_on_each_prefix():
    # With one layer, position p's output depends on the frequencies of p + 1 tokens only: Llama's last logits of
    # the prefix of p + 1 tokens (lengths in increasing order: Llama's module keeps the largest base it has seen).
    byte, llama = make_pair(rope_parameters=DYNAMIC, num_hidden_layers=1)
    ids = random_ids(1, 90, seed=101)
    logits = byte(ids, use_cache=False).logits
    for position in (40, 63, 64, 70, 89):
        torch.testing.assert_close(logits[:, position], llama(ids[:, :position + 1], use_cache=False).logits[:, -1],
                                   atol=ATOL, rtol=0, msg=f"position {position}")


@pytest.mark.slow
@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_dynamic_rope_generate_is_exact_across_max_positions(cache_implementation):
    """Every generated token's logits equal a full forward pass over the sequence so far, also past
    max_position_embeddings=64, where transformers' Llama (keys rotated once, with the frequencies of their time)
    no longer matches its own forward pass."""
    byte, llama = make_pair(rope_parameters=DYNAMIC)
    ids = random_ids(1, 58, seed=19)  # 58 + 12 new tokens crosses max_position_embeddings=64 while decoding
    kwargs = dict(GEN, return_dict_in_generate=True, output_logits=True)
    if cache_implementation:
        kwargs["cache_implementation"] = cache_implementation
    out_byte, out_llama = byte.generate(ids, **kwargs), llama.generate(ids, **kwargs)
    sequence = out_byte.sequences
    full = byte(sequence[:, :-1], use_cache=False).logits
    llama_drift = []
    for step, logits in enumerate(out_byte.logits):
        length = ids.shape[1] + step
        torch.testing.assert_close(logits, full[:, length - 1], atol=ATOL, rtol=0, msg=f"length {length}")
        if torch.equal(out_llama.sequences[:, :length], sequence[:, :length]):
            own = llama(sequence[:, :length], use_cache=False).logits[:, -1]
            llama_drift.append((length, (out_llama.logits[step] - own).abs().max().item()))
    assert all(drift < ATOL for length, drift in llama_drift if length <= 64)
    assert any(drift > 1e-3 for length, drift in llama_drift if length > 64)


@pytest.mark.slow
@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_dynamic_rope_left_padded_generate_past_max_positions_matches_rows_alone(cache_implementation):
    byte, _ = make_pair(rope_parameters=DYNAMIC)
    ids, mask = left_pad(random_ids(2, 58, seed=5), [50, 58])
    kwargs = dict(GEN, max_new_tokens=14, return_dict_in_generate=True, output_logits=True)  # up to 72 tokens
    if cache_implementation:
        kwargs["cache_implementation"] = cache_implementation
    batch = byte.generate(ids, attention_mask=mask, **kwargs)
    for row, length in enumerate((50, 58)):
        alone = byte.generate(ids[row:row + 1, 58 - length:], **dict(kwargs, cache_implementation=None))
        assert torch.equal(alone.sequences[0, length:], batch.sequences[row, 58:]), row
        for step_alone, step_batch in zip(alone.logits, batch.logits):
            torch.testing.assert_close(step_alone[0], step_batch[row], atol=ATOL, rtol=0)


@pytest.mark.slow
def test_dynamic_rope_left_padded_cache_decoding_past_max_positions_matches_full_forward():
    byte, _ = make_pair(rope_parameters=DYNAMIC)
    ids, mask = left_pad(random_ids(2, 80, seed=31), [70, 80])
    full = byte(ids, attention_mask=mask, use_cache=False).logits
    cache = DynamicCache(config=byte.config)
    steps = [byte(ids[:, :50], attention_mask=mask[:, :50], past_key_values=cache, use_cache=True).logits]
    for t in range(50, 80):
        steps.append(byte(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                          use_cache=True).logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], atol=ATOL, rtol=0)
    # Each row equals itself alone: positions count real tokens, so padding never rescales a row.
    for row, length in enumerate((70, 80)):
        alone = byte(ids[row:row + 1, 80 - length:], use_cache=False).logits[0]
        torch.testing.assert_close(full[row, 80 - length:], alone, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------- features on
def test_feature_model_runs_and_has_extra_parameters():
    torch.manual_seed(0)
    byte = ByteModel(tiny_config(parallel_residual=True, layer_scale_init=1e-4, drop_path_rate=0.1))
    ids = random_ids(2, 8, seed=18)
    byte.train()
    out = byte(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    extra = {n for n, _ in byte.named_parameters()} - set(LlamaForCausalLM(llama_config_from(byte.config))
                                                          .state_dict())
    assert extra == {f"model.layers.{i}.{b}_layer_scale.gamma" for i in range(2) for b in ("attn", "mlp")}
    byte.eval()
    torch.testing.assert_close(byte(ids).logits, byte(ids).logits, atol=0, rtol=0)  # deterministic in eval


def test_output_hidden_states_match_llama(pair):
    byte, llama = pair
    ids = random_ids(2, 9, seed=31)
    ours = byte(ids, output_hidden_states=True).hidden_states
    theirs = llama(ids, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == byte.config.num_hidden_layers + 1
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=0)


def test_shift_labels_equal_shifted_labels(pair):
    byte, llama = pair
    ids = random_ids(2, 10, seed=41)
    labels = ids.clone()
    labels[0, :3] = -100
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    ours = byte(ids, shift_labels=shifted).loss
    torch.testing.assert_close(ours, byte(ids, labels=labels).loss, atol=0, rtol=0)
    torch.testing.assert_close(ours, llama(ids, labels=labels).loss, atol=1e-5, rtol=0)
    # Packed windows: the target of the last position is the next window's first token, which labels cannot express.
    window = random_ids(1, 11, seed=42)
    loss = byte(window[:, :-1], shift_labels=window[:, 1:]).loss
    expected = torch.nn.functional.cross_entropy(byte(window[:, :-1]).logits[0], window[0, 1:])
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------- attention interface and continuous batching
MOE = {"num_experts": 4, "num_experts_per_tok": 2}


def make_reference_pair(impl: str, moe: bool):
    """A randomised ByteModel and transformers' Llama (dense) or Mixtral (MoE) with the same weights, both built with
    attention implementation `impl`."""
    from transformers import MixtralForCausalLM

    from model import mixtral_state_dict

    torch.manual_seed(0)
    config = tiny_config(pad_token_id=0, **(MOE if moe else {}))
    byte = randomize_(ByteModel._from_config(config, attn_implementation=impl)).eval()
    if moe:
        reference = MixtralForCausalLM._from_config(config.to_mixtral_config(), attn_implementation=impl)
        reference.load_state_dict(mixtral_state_dict(byte.state_dict()), strict=True)
    else:
        reference = LlamaForCausalLM._from_config(config.to_llama_config(), attn_implementation=impl)
        reference.load_state_dict(byte.state_dict(), strict=True)
    return byte, reference.eval()


@pytest.mark.parametrize("moe", [False, True], ids=["llama", "mixtral"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_each_attention_implementation_matches_the_reference_on_padded_batches(impl, moe):
    byte, reference = make_reference_pair(impl, moe)
    assert byte.config._attn_implementation == reference.config._attn_implementation == impl
    ids = random_ids(3, 12, seed=5)
    for side in ("left", "right"):
        mask = torch.ones_like(ids)
        if side == "left":
            mask[0, :4] = mask[2, :7] = 0
        else:
            mask[0, 8:] = mask[2, 5:] = 0
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        real = mask.bool()
        byte_logits = byte(ids, attention_mask=mask, position_ids=position_ids).logits
        reference_logits = reference(ids, attention_mask=mask, position_ids=position_ids).logits
        torch.testing.assert_close(byte_logits[real], reference_logits[real], atol=ATOL, rtol=0)


def test_a_registered_attention_function_is_called(tmp_path):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def counting_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append(module.layer_idx)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("counting_sdpa", counting_attention)
    byte, _ = make_pair()
    ids = random_ids(2, 9)
    expected = byte(ids).logits
    byte.save_pretrained(tmp_path)
    counted = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="counting_sdpa").eval()
    torch.testing.assert_close(counted(ids).logits, expected, atol=0, rtol=0)
    assert calls == list(range(byte.config.num_hidden_layers))


def test_a_saved_folder_loads_with_the_implementation_asked_for(pair, tmp_path):
    byte, llama = pair
    byte.save_pretrained(tmp_path)
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", trust_remote_code=True)
    assert eager.config._attn_implementation == "eager"
    assert AutoModel.from_pretrained(tmp_path, trust_remote_code=True).config._attn_implementation == "sdpa"
    ids = random_ids(2, 10)
    torch.testing.assert_close(eager.eval()(ids).logits, llama(ids).logits, atol=ATOL, rtol=0)


def small_cache():
    """A paged cache sized for a test: left to size itself, it takes most of the free memory (seconds to allocate)."""
    from transformers import ContinuousBatchingConfig

    return ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=256)


def continuous_batching_tokens(model, prompts: list[list[int]], max_new_tokens: int = 10) -> list[list[int]]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    outputs = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False,
                                   continuous_batching_config=small_cache())
    return [output.generated_tokens for output in sorted(outputs.values(), key=lambda output: output.request_id)]


def generate_tokens(model, prompt: list[int], max_new_tokens: int = 10) -> list[int]:
    ids = torch.tensor([prompt])
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("implementation, moe", [("sdpa", False), ("sdpa", True), ("eager", False)],
                         ids=["llama", "mixtral", "llama-eager"])
def test_continuous_batching_equals_generate_and_the_reference(implementation, moe):
    byte, reference = make_reference_pair(implementation, moe)
    prompts = [[5, 6, 7], list(range(9, 20)), [20], [30, 31, 32, 33, 34]]
    expected = [generate_tokens(byte, prompt) for prompt in prompts]
    assert continuous_batching_tokens(byte, prompts) == expected
    assert continuous_batching_tokens(reference, prompts) == expected


@pytest.mark.slow
def test_a_request_joining_a_running_batch_gets_the_tokens_it_gets_alone():
    from transformers import GenerationConfig

    byte, _ = make_reference_pair("sdpa", moe=False)
    first, joining = list(range(3, 15)), [40, 41, 42]
    config = GenerationConfig(max_new_tokens=24, do_sample=False, eos_token_id=-1, pad_token_id=0)
    manager = byte.init_continuous_batching(generation_config=config, continuous_batching_config=small_cache())
    manager.start()
    try:
        manager.add_request(first, request_id="first", max_new_tokens=24, streaming=True)
        for output in manager.request_id_iter("first"):  # the first request is decoding when the second arrives
            if len(output.generated_tokens) >= 4:
                break
        manager.add_request(joining, request_id="joining", max_new_tokens=8)
        results = {}
        while len(results) < 2:
            output = manager.get_result(timeout=60)
            assert output is not None, "no result within a minute"
            if output.is_finished():
                results[output.request_id] = output.generated_tokens
    finally:
        manager.stop(block=True)
    assert results["first"] == generate_tokens(byte, first, 24)
    assert results["joining"] == generate_tokens(byte, joining, 8)


def test_dynamic_rope_refuses_continuous_batching():
    byte, _ = make_pair(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="continuous batching needs a model without dynamic NTK RoPE"):
        continuous_batching_tokens(byte, [[5, 6, 7]])


# ---------------------------------------------------------------------------------------- sliding-window attention
def sliding_pair(window: int):
    """A randomised ByteModel with a sliding window and transformers' Mistral holding the same weights."""
    from transformers import MistralForCausalLM

    torch.manual_seed(0)
    byte = randomize_(ByteModel(tiny_config(pad_token_id=0, sliding_window=window))).eval()
    mistral = MistralForCausalLM._from_config(byte.config.to_mistral_config(), attn_implementation="sdpa").eval()
    mistral.load_state_dict(byte.state_dict(), strict=True)
    return byte, mistral


def test_sliding_window_logits_equal_mistral_and_cached_decoding_equals_the_full_forward():
    byte, mistral = sliding_pair(5)
    ids = random_ids(2, 20, seed=6)
    full = byte(ids).logits
    torch.testing.assert_close(full, mistral(ids).logits, atol=ATOL, rtol=0)
    # The window matters: the same model attending to everything gives other logits past it.
    unbounded = ByteModel(tiny_config(pad_token_id=0)).eval()
    unbounded.load_state_dict(byte.state_dict())
    assert (unbounded(ids).logits[:, 5:] - full[:, 5:]).abs().max() > 1e-3
    torch.testing.assert_close(unbounded(ids).logits[:, :5], full[:, :5], atol=ATOL, rtol=0)

    cache = DynamicCache(config=byte.config)
    steps = [byte(ids[:, :3], cache=cache, use_cache=True).logits]
    steps += [byte(ids[:, index:index + 1], cache=cache, use_cache=True).logits for index in range(3, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
    # A sliding layer keeps the window's earlier tokens only, however long the sequence.
    assert all(layer.keys.shape[2] == 4 for layer in cache.layers)


@pytest.mark.slow
def test_sliding_window_generate_equals_mistral_and_a_full_layer_keeps_everything():
    byte, mistral = sliding_pair(4)
    prompt = random_ids(1, 6, seed=7)
    tokens = byte.generate(prompt, **{**GEN, "max_new_tokens": 40}, return_dict_in_generate=True)
    assert torch.equal(tokens.sequences, mistral.generate(prompt, **{**GEN, "max_new_tokens": 40}))
    assert [layer.keys.shape[2] for layer in getattr(tokens, CACHE_FIELD).layers] == [3, 3]

    hybrid = ByteModel(tiny_config(pad_token_id=0, sliding_window=4, layer_types=["sliding_attention",
                                                                                  "full_attention"])).eval()
    cache = getattr(hybrid.generate(prompt, **{**GEN, "max_new_tokens": 40}, return_dict_in_generate=True),
                    CACHE_FIELD)
    assert [layer.keys.shape[2] for layer in cache.layers] == [3, 6 + 40 - 1]


@pytest.mark.parametrize("overrides, message", [
    ({"sliding_window": 0}, "sliding_window must be null or a positive integer"),
    ({"layer_types": ["full_attention"]}, "layer_types must list"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "sliding_window is null"),
    ({"sliding_window": 8, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
     "sliding_window with dynamic RoPE is not supported"),
])
def test_sliding_window_settings_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)
