"""utils/grpo.py: the GRPO loss equals TRL's GRPOTrainer `_compute_loss` (loss and every gradient) for each loss type
with and without the KL term, advantages follow TRL's formula, the loss does not depend on the micro-batch split,
and completion masks end at the first end token."""

import copy
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import nanstd

from helpers import randomize_, tiny_config
from model import ByteModel
from utils.config import RlhfSection
from utils.grpo import GRPOLoss, completion_mask, group_advantages, token_logps

ROOT = Path(__file__).resolve().parents[1]
TEMPERATURE = 0.7
COMPLETION = 6
EPSILON, EPSILON_HIGH = 0.15, 0.28  # neither at its default, so that both must reach the loss


def constant_reward(completions, **kwargs):
    return [0.0 for _ in completions]


@pytest.fixture(scope="module")
def rollout_batch() -> dict:
    """Left-padded prompts and right-padded completions (one with no end token) of a tiny model, with advantages
    of both signs and old log-probabilities far enough from the policy's that clipping happens on both sides."""
    torch.manual_seed(0)
    model = ByteModel(tiny_config(vocab_size=96, hidden_size=32, eos_token_id=2, pad_token_id=0)).train()
    rows, prompt_width = 6, 5
    prompt_ids = torch.randint(3, 96, (rows, prompt_width))
    prompt_mask = torch.ones_like(prompt_ids)
    for row, padding in enumerate([0, 2, 1, 0, 3, 0]):
        prompt_ids[row, :padding], prompt_mask[row, :padding] = 0, 0
    completion_ids = torch.randint(3, 96, (rows, COMPLETION))
    for row, end in enumerate([5, 2, 3, None, 0, 4]):
        if end is not None:
            completion_ids[row, end] = 2
    mask = completion_mask(completion_ids, 2)
    completion_ids = completion_ids.masked_fill(mask == 0, 0)
    batch = {"input_ids": torch.cat([prompt_ids, completion_ids], 1),
             "attention_mask": torch.cat([prompt_mask, mask], 1), "completion_mask": mask,
             "advantages": torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9, -0.3])}
    with torch.no_grad():
        logps = token_logps(model, batch, TEMPERATURE)[0]
    generator = torch.Generator().manual_seed(1)
    batch["old_logps"] = logps + 0.4 * torch.randn(logps.shape, generator=generator)
    batch["reference_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=generator)
    return {"model": model, "batch": batch, "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids}


@pytest.fixture(scope="module")
def trl_trainer(rollout_batch, tmp_path_factory) -> GRPOTrainer:
    model = copy.deepcopy(rollout_batch["model"])
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=6, num_generations=2,
                      max_completion_length=COMPLETION, temperature=TEMPERATURE, epsilon=EPSILON,
                      epsilon_high=EPSILON_HIGH, beta=0.0, report_to="none", use_cpu=True, bf16=False, logging_steps=1)
    dataset = Dataset.from_dict({"prompt": ["a", "b", "c"]})
    trainer = GRPOTrainer(model=model, reward_funcs=constant_reward, args=args, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(ROOT / "tokenizer"))
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def ours(rollout_batch, loss_type: str, beta: float, rows: slice = slice(None), num_items: float | None = None):
    section = RlhfSection(method="grpo", beta=beta, loss_type=loss_type, temperature=TEMPERATURE, epsilon=EPSILON,
                          epsilon_high=EPSILON_HIGH, max_completion_tokens=COMPLETION)
    batch = {key: value[rows] for key, value in rollout_batch["batch"].items()}
    batch["targets"] = int(batch["completion_mask"].sum()) if loss_type in ("bnpo", "dapo") else len(
        batch["input_ids"])
    return GRPOLoss(section, rollout_batch["model"].config)(rollout_batch["model"], batch, num_items)


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_and_gradients_equal_trl(rollout_batch, trl_trainer, loss_type, beta):
    batch = rollout_batch["batch"]
    trl_trainer.loss_type, trl_trainer.beta = loss_type, beta
    inputs = {"prompt_ids": rollout_batch["prompt_ids"], "prompt_mask": rollout_batch["prompt_mask"],
              "completion_ids": rollout_batch["completion_ids"], "completion_mask": batch["completion_mask"],
              "advantages": batch["advantages"], "old_per_token_logps": batch["old_logps"],
              "ref_per_token_logps": batch["reference_logps"],
              "num_items_in_batch": batch["completion_mask"].sum().float()}
    reference_model = trl_trainer.model.train()
    reference_loss = trl_trainer._compute_loss(reference_model, inputs)
    reference_loss.backward()
    expected = gradients(reference_model)

    output = ours(rollout_batch, loss_type, beta)
    output.loss.backward()
    actual = gradients(rollout_batch["model"])
    torch.testing.assert_close(output.loss, reference_loss, atol=1e-5, rtol=1e-5)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)
    assert 0 < output.metrics["clip_ratio"] < batch["completion_mask"].sum()  # clipping was exercised
    assert (output.metrics["kl"] > 0) == (beta > 0)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batch_split_gives_the_same_loss_and_gradients(rollout_batch, loss_type):
    model = rollout_batch["model"]
    whole = ours(rollout_batch, loss_type, 0.04)
    whole.loss.backward()
    expected = gradients(model)
    per_token = loss_type == "dapo"
    total = float(rollout_batch["batch"]["completion_mask"].sum()) if per_token else 6.0
    loss = 0.0
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
        part = ours(rollout_batch, loss_type, 0.04, rows, num_items=total)
        part.loss.backward()
        loss += part.loss.item()
    actual = gradients(model)
    assert loss == pytest.approx(whole.loss.item(), abs=1e-6)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_follow_trls_formula(scale):
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, float("nan"), 1.0, 3.0, 0.2, 0.2, 0.2, 0.2])
    group = 4
    mean = torch.nanmean(rewards.view(-1, group), dim=1).repeat_interleave(group)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(rewards.view(-1, group), dim=1).repeat_interleave(group)
    expected = rewards - mean
    if scale != "none":
        expected = expected / (std + 1e-4)
    expected = torch.nan_to_num(expected, nan=0.0)  # TRL zeroes the advantage of an unscorable completion
    advantages, group_std = group_advantages(rewards, group, scale, nanstd(rewards) if scale == "batch" else None)
    torch.testing.assert_close(advantages, expected)
    assert group_std[2] == 0  # a group with one reward for all: no signal


def test_completion_mask_ends_at_the_first_end_token():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 5, 5, 5]])
    assert completion_mask(ids, 2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_rollouts_ignore_the_generation_settings_saved_with_the_model():
    """A folder's generation_config.json (a repetition penalty, a ban on repeated tokens) must not shape the
    completions: the loss scores them under the plain distribution."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from utils.grpo import GRPORollout

    torch.manual_seed(0)
    model = ByteModel(tiny_config(vocab_size=16, hidden_size=32, eos_token_id=15, pad_token_id=0)).eval()
    prompt = torch.tensor([[3, 4, 3, 4, 3, 4]])
    plain = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=GenerationConfig(
        do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0))[:, 6:]
    model.generation_config = GenerationConfig(repetition_penalty=5.0, no_repeat_ngram_size=1)
    rollout = GRPORollout.__new__(GRPORollout)
    rollout.trainer = SimpleNamespace(model=model, context=SimpleNamespace(device=torch.device("cpu")),
                                      dtype=torch.float32)
    rollout.section = RlhfSection(method="grpo", max_completion_tokens=12)
    rollout.eos_token_id, rollout.pad_token_id, rollout.synced = 15, 0, False
    completion, _ = rollout.generate(prompt, torch.ones_like(prompt), sample=False)
    assert len(set(plain[0].tolist())) < plain.shape[1]  # the plain greedy reply repeats a token...
    assert torch.equal(completion, plain)  # ...and so does the rollout's, whatever the folder says
    assert model.generation_config.repetition_penalty == 5.0  # restored afterwards


def test_rollouts_sample_with_the_sections_temperature_top_k_and_top_p(monkeypatch):
    """The rollout's draw takes rlhf.temperature, top_k and top_p (utils/sampling.py's processors, tested against
    transformers' warpers there); top-k 1 leaves the greedy reply, plain sampling does not."""
    from types import SimpleNamespace

    import utils.grpo
    from utils.grpo import GRPORollout

    seen = []
    real = utils.grpo.sampling_processors
    monkeypatch.setattr(utils.grpo, "sampling_processors", lambda *settings: seen.append(settings) or real(*settings))
    torch.manual_seed(0)
    model = randomize_(ByteModel(tiny_config(vocab_size=64, hidden_size=32, eos_token_id=63, pad_token_id=0))).eval()
    prompt = torch.tensor([[3, 4, 5, 6]] * 4)
    rollout = GRPORollout.__new__(GRPORollout)
    rollout.trainer = SimpleNamespace(model=model, context=SimpleNamespace(device=torch.device("cpu")),
                                      dtype=torch.float32)
    rollout.eos_token_id, rollout.pad_token_id, rollout.synced = 63, 0, False
    completions = {}
    for name, settings in {"greedy": {}, "top-k 1": dict(temperature=1.7, top_k=1, top_p=0.9),
                           "sampled": dict(temperature=1.7)}.items():
        rollout.section = RlhfSection(method="grpo", max_completion_tokens=10, **settings)
        completions[name] = rollout.generate(prompt, torch.ones_like(prompt), sample=name != "greedy")[0]
    assert seen == [(1.7, 1, 0.9), (1.7, 0, 1.0)]
    assert torch.equal(completions["top-k 1"], completions["greedy"])
    assert not torch.equal(completions["sampled"], completions["greedy"])
