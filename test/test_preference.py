"""utils/preference.py: DPO, IPO and RPO losses and gradients against TRL's DPOTrainer, conservative DPO, fp32 reply
log-probabilities, micro-batch invariance, the three reference modes, and an MoE policy's router terms."""

import copy
import logging
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from helpers import BOS, EOS, GRAD_TOL, PAD, grads, tiny_config, write_lines
from model import ByteModel, moe_layers
from utils.config import LoraSection, RlhfSection
from utils.data import PairCollator, PreferenceDataset
from utils.distributed import DistributedContext
from utils.lora import add_lora
from utils.preference import PreferenceLoss, Reference, attach_reference_logps, pair_losses, reply_logps

LN2 = math.log(2)
SEQ_LEN = 128

# Replies of different lengths, so that per-token averages (IPO, RPO) differ from sums and padding is exercised.
RECORDS = [
    {"prompt": [{"role": "user", "content": "What is 2 + 3?"}],
     "chosen": [{"role": "assistant", "content": "2 + 3 = 5."}],
     "rejected": [{"role": "assistant", "content": "It is 6, I am quite sure of it."}]},
    {"prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}],
     "chosen": [{"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "assistant", "content": "A cat"}]},
    {"prompt": [{"role": "user", "content": "你好，请介绍一下你自己。"}],
     "chosen": [{"role": "assistant", "content": "我是一个小模型，可以回答简单的问题。"}],
     "rejected": [{"role": "assistant", "content": "不知道。"}]},
    {"prompt": [{"role": "user", "content": "Write a Python function that adds two numbers."}],
     "chosen": [{"role": "assistant", "content": "def add(a, b):\n    return a + b"}],
     "rejected": [{"role": "assistant", "content": "print('hello')"}]},
]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_lines(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", RECORDS)


@pytest.fixture
def dataset(pairs_file, tokenizer):
    # Function scope: the precompute test attaches reference log-probabilities to it.
    return PreferenceDataset([str(pairs_file)], tokenizer, SEQ_LEN)


def collate(dataset, indices=None) -> dict[str, torch.Tensor]:
    indices = range(len(dataset)) if indices is None else indices
    return PairCollator(PAD)([dataset[index] for index in indices])


def byte_config(**overrides):
    # The demo tokenizer's vocabulary and special ids (the tokenizer fixture checks them).
    return tiny_config(vocab_size=6400, max_position_embeddings=SEQ_LEN, pad_token_id=PAD, bos_token_id=BOS,
                       eos_token_id=EOS, **overrides)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return ByteModel(byte_config()).eval()


def perturbed(model: torch.nn.Module, seed: int = 1, std: float = 0.02) -> torch.nn.Module:
    """A copy of `model` that has moved away from it, as a policy does after some training."""
    policy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(std * torch.randn(param.shape, generator=generator))
    return policy.train()


def frozen(model: torch.nn.Module) -> Reference:
    return Reference(copy.deepcopy(model))


def hand_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the labelled tokens' log-probabilities summed position by position, and how many there are."""
    sums, counts = [], []
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    for row in range(labels.shape[0]):
        positions = [t for t in range(1, labels.shape[1]) if labels[row, t] != -100]
        sums.append(sum(log_probs[row, t - 1, labels[row, t]] for t in positions))
        counts.append(len(positions))
    return torch.stack(sums), torch.tensor(counts)


# ---------------------------------------------------------------------------------------------------------------
# Against TRL
# ---------------------------------------------------------------------------------------------------------------

TRL_CASES = {
    "dpo": (dict(method="dpo", beta=0.1), dict(loss_type=["sigmoid"], beta=0.1), 4),
    "ipo": (dict(method="ipo", beta=0.5), dict(loss_type=["ipo"], beta=0.5), 4),
    # TRL's "sft" term is one token mean over the whole batch, ours a mean per pair (so a pair's weight does not
    # depend on the lengths of the others in its micro-batch): the two coincide for a single pair.
    "rpo": (dict(method="dpo", beta=0.1, sft_weight=0.7), dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7],
                                                                beta=0.1), 1),
}


def trl_trainer(tmp_path, tokenizer, policy, reference, **settings) -> DPOTrainer:
    # bf16=False: TRL's default would run the reference model under bf16 autocast on the CPU.
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=4, max_length=None,
                     bf16=False, use_cpu=True, **settings)
    return DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(RECORDS[:1]),
                      processing_class=tokenizer)


@pytest.mark.parametrize("case", list(TRL_CASES))
def test_loss_and_gradients_match_trl(tmp_path, tokenizer, dataset, base, case):
    ours_settings, trl_settings, num_pairs = TRL_CASES[case]
    policy = perturbed(base)
    trl_policy, our_policy = copy.deepcopy(policy), copy.deepcopy(policy)
    trainer = trl_trainer(tmp_path, tokenizer, trl_policy, copy.deepcopy(base), **trl_settings)
    # The same token ids on both sides: replies end at the end token, without the template's newline after it.
    examples = [{"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
                for prompt, chosen, rejected in dataset.pairs[:num_pairs]]
    inputs = trainer.data_collator(examples)
    batch = collate(dataset, range(num_pairs))
    assert torch.equal(inputs["input_ids"], batch["input_ids"])

    trl_loss = trainer.compute_loss(trl_policy, inputs)
    trl_loss.backward()
    objective = PreferenceLoss(RlhfSection(**ours_settings), frozen(base), our_policy.config)
    loss = objective(our_policy, batch, None).loss
    torch.testing.assert_close(loss, trl_loss, atol=1e-5, rtol=1e-5)
    assert abs(loss.item() - LN2) > 1e-3  # the policy has moved: not the value every loss starts from
    assert objective(our_policy, batch, num_pairs).loss.item() == pytest.approx(loss.item(), abs=1e-7)
    our_policy.zero_grad()
    objective(our_policy, batch, num_pairs).loss.backward()
    trl_grads, our_grads = grads(trl_policy), grads(our_policy)
    assert our_grads.keys() == trl_grads.keys() == dict(our_policy.named_parameters()).keys()
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, trl_grads[name], **GRAD_TOL, msg=name)


def cdpo(beta: float, epsilon: float, delta: torch.Tensor) -> torch.Tensor:
    """Conservative DPO as in Mitchell's note: the preference label is flipped with probability epsilon."""
    p = 1 / (1 + torch.exp(-beta * delta.double()))
    return -(1 - epsilon) * torch.log(p) - epsilon * torch.log(1 - p)


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
def test_conservative_dpo_follows_the_label_smoothing_formula(epsilon):
    generator = torch.Generator().manual_seed(0)
    logps = -20 * torch.rand(6, 2, generator=generator)
    reference = logps + torch.randn(6, 2, generator=generator)
    counts = torch.randint(1, 30, (6, 2), generator=generator)
    losses = pair_losses("dpo", 0.3, epsilon, logps, reference, counts)
    delta = (logps - reference) @ torch.tensor([1.0, -1.0])
    torch.testing.assert_close(losses.double(), cdpo(0.3, epsilon, delta), atol=1e-6, rtol=1e-6)
    if epsilon == 0:
        torch.testing.assert_close(losses, -F.logsigmoid(0.3 * delta), atol=1e-6, rtol=0)
    else:  # smoothing moves the loss: it is not silently ignored
        assert (losses - -F.logsigmoid(0.3 * delta)).abs().max() > 1e-3


def test_conservative_dpo_through_the_model(dataset, base):
    policy, batch = perturbed(base).eval(), collate(dataset)
    section = RlhfSection(beta=0.2, label_smoothing=0.25)
    loss = PreferenceLoss(section, frozen(base), policy.config)(policy, batch, None).loss
    with torch.no_grad():
        logps = hand_logps(policy(input_ids=batch["input_ids"]).logits, batch["labels"])[0]
        reference = hand_logps(base(input_ids=batch["input_ids"]).logits, batch["labels"])[0]
    delta = torch.stack((logps - reference).chunk(2)).T @ torch.tensor([1.0, -1.0], dtype=torch.float64)
    assert loss.item() == pytest.approx(cdpo(0.2, 0.25, delta).mean().item(), abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Reply log-probabilities
# ---------------------------------------------------------------------------------------------------------------

def random_labels(generator: torch.Generator, rows: int = 3, length: int = 9, vocab: int = 50) -> torch.Tensor:
    labels = torch.randint(0, vocab, (rows, length), generator=generator)
    labels[0, :4] = -100  # a prompt
    labels[1, :2] = labels[1, 6:] = -100  # a prompt and padding
    labels[2, :] = -100  # nothing labelled: a sum of zero terms
    labels[2, 5] = 7
    return labels


def test_reply_logps_is_the_sum_over_labelled_positions():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 9, 50, generator=generator)
    labels = random_labels(generator)
    sums, counts = reply_logps(logits, labels)
    expected_sums, expected_counts = hand_logps(logits, labels)
    assert counts.tolist() == expected_counts.tolist() == [5, 4, 1]
    torch.testing.assert_close(sums.double(), expected_sums, atol=1e-5, rtol=0)
    assert reply_logps(logits, torch.full_like(labels, -100))[0].tolist() == [0.0, 0.0, 0.0]


def test_reply_logps_is_fp32_under_bf16_autocast():
    generator = torch.Generator().manual_seed(0)
    # A vocabulary and logit scale like a real model's, where bf16 log-softmax sums lose whole units.
    logits = 8 * torch.randn(3, 9, 6400, generator=generator)
    labels = random_labels(generator, vocab=6400)
    exact = reply_logps(logits, labels)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear_out = F.linear(logits, torch.eye(6400))  # bf16 logits, as a model under autocast
        assert linear_out.dtype == torch.bfloat16
        sums, _ = reply_logps(linear_out, labels)
        from_fp32 = reply_logps(logits, labels)[0]
    assert sums.dtype == from_fp32.dtype == torch.float32
    torch.testing.assert_close(from_fp32, exact, atol=1e-5, rtol=0)
    # bf16 inputs are only rounded, not reduced in bf16: the sums stay as close as that rounding allows
    torch.testing.assert_close(sums, reply_logps(linear_out.float(), labels)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(sums, exact, atol=0.5, rtol=0)
    # ... whereas a log-softmax in bf16 is a different number: the check above can tell them apart
    bf16 = torch.log_softmax(linear_out, dim=-1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    bf16 = (bf16 * (labels[:, 1:] != -100)).float().sum(-1)
    assert (bf16 - sums).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------------------------

def test_policy_equal_to_reference_gives_ln2_and_coin_flip_accuracy(dataset, base):
    policy, batch = copy.deepcopy(base).train(), collate(dataset)
    output = PreferenceLoss(RlhfSection(beta=0.1), frozen(base), policy.config)(policy, batch, None)
    assert output.loss.item() == pytest.approx(LN2, abs=1e-6)
    metrics = {name: value.item() for name, value in output.metrics.items()}
    assert metrics["reward_accuracy"] == 0.5 * len(dataset)  # sums over pairs: each tie counts half
    assert metrics["rewards_chosen"] == metrics["rewards_rejected"] == metrics["reward_margin"] == 0.0
    with torch.no_grad():
        logps = hand_logps(base(input_ids=batch["input_ids"]).logits, batch["labels"])[0]
    assert metrics["logps_chosen"] == pytest.approx(logps[:len(dataset)].sum().item(), abs=1e-4)
    assert metrics["logps_rejected"] == pytest.approx(logps[len(dataset):].sum().item(), abs=1e-4)
    output.loss.backward()  # a tie still has a gradient: the loss is not a constant
    assert any(param.grad.abs().max() > 0 for param in policy.parameters())


def test_rewards_and_accuracy_per_pair(dataset, base):
    policy, batch = perturbed(base, std=0.05), collate(dataset)
    objective = PreferenceLoss(RlhfSection(beta=0.3), frozen(base), policy.config)
    output = objective(policy, batch, None)
    with torch.no_grad():
        logps = hand_logps(policy(input_ids=batch["input_ids"]).logits, batch["labels"])[0]
        reference = hand_logps(base(input_ids=batch["input_ids"]).logits, batch["labels"])[0]
    rewards = 0.3 * torch.stack((logps - reference).chunk(2), dim=1)
    margins = rewards[:, 0] - rewards[:, 1]
    assert output.metrics["rewards_chosen"].item() == pytest.approx(rewards[:, 0].sum().item(), abs=1e-4)
    assert output.metrics["rewards_rejected"].item() == pytest.approx(rewards[:, 1].sum().item(), abs=1e-4)
    assert output.metrics["reward_margin"].item() == pytest.approx(margins.sum().item(), abs=1e-4)
    assert output.metrics["reward_accuracy"].item() == (margins > 0).sum().item()
    # The same pairs with chosen and rejected exchanged: every margin changes sign, accuracy is the complement.
    swapped = PairCollator(PAD)([{**dataset[index], "chosen": dataset[index]["rejected"],
                                  "rejected": dataset[index]["chosen"]} for index in range(len(dataset))])
    flipped = objective(policy, swapped, None)
    assert flipped.metrics["reward_margin"].item() == pytest.approx(-margins.sum().item(), abs=1e-4)
    assert flipped.metrics["reward_accuracy"].item() + output.metrics["reward_accuracy"].item() == len(dataset)
    assert flipped.metrics["rewards_chosen"].item() == pytest.approx(rewards[:, 1].sum().item(), abs=1e-4)


SECTIONS = {"dpo": RlhfSection(beta=0.1), "ipo": RlhfSection(method="ipo", beta=0.5),
            "cdpo_rpo": RlhfSection(beta=0.1, label_smoothing=0.2, sft_weight=0.5)}


@pytest.mark.parametrize("name", list(SECTIONS))
def test_micro_batches_add_up_to_the_full_batch(dataset, base, name):
    policy = perturbed(base)
    objective = PreferenceLoss(SECTIONS[name], frozen(base), policy.config)
    full = objective(policy, collate(dataset), 4).loss
    full.backward()
    expected = grads(policy)
    assert full.item() == pytest.approx(objective(policy, collate(dataset), None).loss.item(), abs=1e-6)
    for split in ([0], [1, 2, 3]), ([0, 1], [2, 3]), ([0, 1, 2, 3],):
        policy.zero_grad()
        total = 0.0
        for indices in split:
            # Each micro-batch is padded to its own longest row.
            loss = objective(policy, collate(dataset, indices), 4).loss
            loss.backward()
            total += loss.item()
        assert total == pytest.approx(full.item(), abs=1e-6)
        for param_name, grad in grads(policy).items():
            torch.testing.assert_close(grad, expected[param_name], atol=1e-6, rtol=1e-5, msg=param_name)


# ---------------------------------------------------------------------------------------------------------------
# Reference modes
# ---------------------------------------------------------------------------------------------------------------

def lora_policy(base: torch.nn.Module, targets=("q_proj", "v_proj", "down_proj")):
    """`base` with adapters whose B matrices are no longer zero, so that the adapters change the output."""
    policy = add_lora(copy.deepcopy(base), LoraSection(enabled=True, rank=4, alpha=8.0, dropout=0.0,
                                                       target_modules=list(targets)))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return policy.train()


def fake_trainer(out_dir, micro_batch_size: int = 2) -> SimpleNamespace:
    """What `attach_reference_logps` reads of a Trainer."""
    return SimpleNamespace(out_dir=out_dir, dtype=torch.float32, context=DistributedContext(),
                           config=SimpleNamespace(train=SimpleNamespace(micro_batch_size=micro_batch_size)),
                           log=logging.getLogger("test_preference"))


def test_reference_with_adapters_off_is_the_base_model(dataset, base):
    policy, batch = lora_policy(base), collate(dataset)
    base_logps = frozen(base)(batch)
    adapters_off = Reference(policy, adapters_off=True)(batch)
    torch.testing.assert_close(adapters_off, base_logps, atol=1e-5, rtol=0)
    assert policy.training  # the reference pass leaves the policy's mode alone
    with torch.no_grad():  # while the adapters are on, the policy is another model
        on = torch.stack(reply_logps(policy(**batch).logits, batch["labels"])[0].chunk(2), dim=1)
    assert (on - base_logps).abs().max() > 1e-2


def test_the_three_reference_modes_give_the_same_loss(tmp_path, dataset, base):
    section = RlhfSection(beta=0.1, sft_weight=0.3)
    policy, batch = lora_policy(base), collate(dataset)
    copy_loss = PreferenceLoss(section, frozen(base), policy.config)(policy, batch, None).loss
    adapters_loss = PreferenceLoss(section, Reference(policy, adapters_off=True), policy.config)(policy, batch,
                                                                                                  None).loss
    assert abs(copy_loss.item() - LN2) > 1e-3
    assert adapters_loss.item() == pytest.approx(copy_loss.item(), abs=1e-6)

    attach_reference_logps(lambda: frozen(base), [dataset], PairCollator(PAD), fake_trainer(tmp_path),
                           str(tmp_path / "src"))
    assert dataset.reference_logps.shape == (len(dataset), 2) and dataset.reference_logps.dtype == torch.float32
    # Computed two pairs at a time (each micro-batch padded differently), the same numbers as in one batch.
    torch.testing.assert_close(dataset.reference_logps, frozen(base)(batch), atol=1e-5, rtol=0)
    precomputed = collate(dataset)
    torch.testing.assert_close(precomputed["reference_logps"], dataset.reference_logps, atol=0, rtol=0)
    # No reference model at all: a call to one would fail.
    precomputed_loss = PreferenceLoss(section, None, policy.config)(policy, precomputed, None).loss
    assert precomputed_loss.item() == pytest.approx(copy_loss.item(), abs=1e-6)
    assert (tmp_path / "reference_logps.pt").is_file()


def failing_reference(batch):
    raise AssertionError("the reference log-probabilities should have been read from reference_logps.pt")


def test_precomputed_reference_is_read_back_for_the_same_pairs_only(tmp_path, tokenizer, pairs_file, dataset, base,
                                                                   caplog):
    trainer, source = fake_trainer(tmp_path / "run"), str(tmp_path / "src")
    attach_reference_logps(lambda: frozen(base), [dataset], PairCollator(PAD), trainer, source)
    first = dataset.reference_logps

    again = PreferenceDataset([str(pairs_file)], tokenizer, SEQ_LEN)
    with caplog.at_level(logging.INFO, logger="test_preference"):
        attach_reference_logps(lambda: failing_reference, [again], PairCollator(PAD), trainer, source)
    assert torch.equal(again.reference_logps, first)
    assert "read from" in caplog.text

    changed_records = copy.deepcopy(RECORDS)
    changed_records[1]["rejected"][0]["content"] = "A dog"
    changed = PreferenceDataset([str(write_lines(tmp_path / "changed.jsonl", changed_records))], tokenizer, SEQ_LEN)
    calls = []

    def counting_reference(batch):
        calls.append(batch["input_ids"].shape[0] // 2)
        return frozen(base)(batch)

    attach_reference_logps(lambda: counting_reference, [changed], PairCollator(PAD), trainer, source)
    assert calls == [2, 2]  # every pair computed again, two per micro-batch
    torch.testing.assert_close(changed.reference_logps[[0, 2, 3]], first[[0, 2, 3]], atol=1e-5, rtol=0)
    assert changed.reference_logps[1, 0].item() == pytest.approx(first[1, 0].item(), abs=1e-5)
    assert abs(changed.reference_logps[1, 1].item() - first[1, 1].item()) > 1e-3
    # Another reference (its source) also means computing again.
    calls.clear()
    attach_reference_logps(lambda: counting_reference, [changed], PairCollator(PAD), trainer,
                           str(tmp_path / "other"))
    assert calls == [2, 2]
    # An unreadable file is computed again and replaced.
    (tmp_path / "run" / "reference_logps.pt").write_bytes(b"not a torch file")
    calls.clear()
    attach_reference_logps(lambda: counting_reference, [changed], PairCollator(PAD), trainer, source)
    assert calls == [2, 2]
    attach_reference_logps(lambda: failing_reference, [changed], PairCollator(PAD), trainer, source)


# ---------------------------------------------------------------------------------------------------------------
# Mixture of experts
# ---------------------------------------------------------------------------------------------------------------

def test_moe_policy_adds_its_router_terms_only_while_training(dataset):
    config = byte_config(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, router_aux_loss_coef=0.05,
                         router_z_loss_coef=0.01)
    torch.manual_seed(0)
    start = ByteModel(config).eval()
    policy, batch = perturbed(start), collate(dataset)
    objective = PreferenceLoss(RlhfSection(beta=0.1), frozen(start), config)
    step_pairs = 2 * len(dataset)  # this micro-batch holds half the step's pairs
    output = objective(policy, batch, step_pairs)
    assert output.aux_loss is not None and output.z_loss is not None
    preference = objective(policy.eval(), batch, step_pairs).loss  # evaluation: the preference loss alone
    router_terms = 0.5 * (0.05 * output.aux_loss + 0.01 * output.z_loss)
    assert output.loss.item() > preference.item()
    assert output.loss.item() == pytest.approx(preference.item() + router_terms.item(), abs=1e-6)
    policy.train()
    output.loss.backward()
    router = [param.grad for name, param in policy.named_parameters() if name.endswith("mlp.gate.weight")]
    assert router and all(grad is not None and grad.abs().max() > 0 for grad in router)


def test_moe_router_statistics_come_from_the_policy_not_the_adapters_off_reference(dataset):
    config = byte_config(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, router_z_loss_coef=0.01)
    torch.manual_seed(0)
    policy, batch = lora_policy(ByteModel(config).eval(), targets=("q_proj", "v_proj")), collate(dataset)
    output = PreferenceLoss(RlhfSection(), Reference(policy, adapters_off=True), config)(policy, batch, None)
    # What the router monitor reads from the layers after the loss: the same layers ran for the reference too.
    counts = [layer.router_stats.expert_counts.clone() for layer in moe_layers(policy)]
    with torch.no_grad():
        own = policy(**batch)
        own_counts = [layer.router_stats.expert_counts for layer in moe_layers(policy)]
        with policy.disable_adapter():
            base = policy(**batch)
    # The adapters change the attention, so the routing: the two forwards have different router statistics.
    assert abs(own.z_loss.item() - base.z_loss.item()) > 1e-6
    assert output.aux_loss.item() == pytest.approx(own.aux_loss.item(), abs=1e-6)
    assert output.z_loss.item() == pytest.approx(own.z_loss.item(), abs=1e-6)
    assert len(counts) == config.num_hidden_layers and all(map(torch.equal, counts, own_counts))
