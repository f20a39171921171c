"""Online reinforcement learning with verifiable rewards: GRPO (Shao et al. 2024) and the variants that normalise its
token losses differently (BNPO, Dr. GRPO, DAPO), with the semantics of TRL's GRPOTrainer.

Every `rlhf.num_iterations` optimizer steps the policy samples `rlhf.num_generations` completions for each of
`rlhf.prompts_per_step` prompts per process (`generate` with the KV cache), the reward functions score them, and a
completion's advantage is its reward minus its group's mean, divided by the group's (or the whole batch's) standard
deviation. The loss is PPO's clipped surrogate on per-token probability ratios against the log-probabilities at
sampling time, plus, with `rlhf.beta` > 0, the k3 estimate of the KL divergence to a frozen reference (weighted by
the same ratio, as TRL's default `use_bias_correction_kl`).
"""

import math
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GenerationConfig

from utils.batches import model_inputs
from utils.distributed import all_gather_objects, all_reduce_sum
from utils.precision import autocast
from utils.preference import PreferenceOutput, reference_model
from utils.rewards import load_reward_functions, score_completions
from utils.sampling import sampling_processors

# What the loss reports, as means over the step's completion tokens.
GRPO_METRICS = ("clip_ratio", "entropy", "kl")
STD_EPSILON = 1e-4  # TRL's: keeps a group whose rewards barely differ from blowing its advantages up


def completion_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted from the first real token of a left-padded row, as generation counted them (passed
    explicitly: a transformers Llama would count from the padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logps(model: nn.Module, batch: dict, temperature: float):
    """(log-probabilities of the completion tokens [rows, completion width] in fp32, their entropies (no gradient),
    the model's outputs). The logits are divided by the sampling temperature first, so that the log-probabilities
    are those of the distribution the completions were drawn from."""
    width = batch["completion_mask"].shape[1]
    # On a CPU the math kernel: at a rollout's lengths (tens of tokens) the flash kernel's backward measured 10x
    # slower (77 ms against 8 ms per update of the demo's model).
    cpu = batch["input_ids"].device.type == "cpu"
    with sdpa_kernel(SDPBackend.MATH) if cpu else nullcontext():
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=completion_positions(batch["attention_mask"]), logits_to_keep=width + 1,
                        use_cache=False)
    with torch.autocast(batch["input_ids"].device.type, enabled=False):
        logits = outputs.logits[:, :-1].float()
        if temperature != 1.0:
            logits = logits / temperature
        log_probs = logits.log_softmax(-1)
        logps = log_probs.gather(-1, batch["input_ids"][:, -width:].unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logps, entropy, outputs


def grpo_targets(batch: dict) -> int:
    """What a step's loss is normalised by: completions (grpo, dr_grpo) or completion tokens (bnpo, dapo), as the
    rollout wrote into each micro-batch."""
    return batch["targets"]


class GRPOLoss:
    """`loss(model, batch, num_items_in_batch)` for the engine. TRL's `_compute_loss` per micro-batch, normalised by
    the whole step's targets on all ranks (`num_items_in_batch`), so that the loss and its gradient do not depend on
    how completions fall into micro-batches and ranks. bnpo and dapo therefore coincide here: TRL's bnpo divides by
    the tokens of one micro-batch, which makes its gradient depend on the split."""

    def __init__(self, section, model_config):
        self.section = section
        self.epsilon_high = section.epsilon if section.epsilon_high is None else section.epsilon_high
        self.router_weights = (getattr(model_config, "router_aux_loss_coef", 0.0) or 0.0,
                               getattr(model_config, "router_z_loss_coef", 0.0) or 0.0)

    def __call__(self, model: nn.Module, batch: dict, num_items_in_batch: float | None) -> PreferenceOutput:
        section = self.section
        logps, entropy, outputs = token_logps(model, batch, section.temperature)
        mask = batch["completion_mask"].float()
        advantages = batch["advantages"].float().unsqueeze(1)
        old_logps = batch.get("old_logps")
        old_logps = logps.detach() if old_logps is None else old_logps
        ratio = torch.exp(logps - old_logps)
        clipped = torch.clamp(ratio, 1 - section.epsilon, 1 + self.epsilon_high)
        per_token = -torch.min(ratio * advantages, clipped * advantages)
        kl = None
        if section.beta != 0.0:
            difference = batch["reference_logps"] - logps
            # k3, weighted by the ratio as TRL does by default: the unbiased reverse-KL gradient off-policy
            # (DeepSeek-V3.2); on-policy the weight is 1 but its gradient is not.
            kl = (torch.exp(difference) - difference - 1) * ratio
            per_token = per_token + section.beta * kl
        targets = grpo_targets(batch)
        total = num_items_in_batch if num_items_in_batch is not None else targets
        if section.loss_type == "grpo":
            loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / total
        elif section.loss_type == "dr_grpo":
            loss = (per_token * mask).sum() / (total * section.max_completion_tokens)
        else:
            loss = (per_token * mask).sum() / total
        aux_loss, z_loss = getattr(outputs, "aux_loss", None), getattr(outputs, "z_loss", None)
        if aux_loss is not None and z_loss is not None and model.training:
            loss = loss + targets / total * (self.router_weights[0] * aux_loss + self.router_weights[1] * z_loss)
        with torch.no_grad():
            # Sums scaled so that the engine's division by the step's targets gives means over its tokens.
            scale = batch.get("metric_scale", 1.0)
            region = ((ratio < 1 - section.epsilon) & (advantages < 0)) | ((ratio > 1 + self.epsilon_high)
                                                                           & (advantages > 0))
            metrics = {"clip_ratio": (region.float() * mask).sum() * scale, "entropy": (entropy * mask).sum() * scale,
                       "kl": (kl * mask).sum() * scale if kl is not None else torch.zeros((), device=mask.device)}
        return PreferenceOutput(loss, metrics, aux_loss, z_loss)


def grpo_objective(trainer) -> GRPOLoss:
    return GRPOLoss(trainer.config.rlhf, trainer.model.config)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str, batch_std: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's advantages: (reward - group mean) / (std + 1e-4), std of the group (`group`) or of the whole batch
    (`batch`, given as `batch_std`: it spans all ranks), none for `none`. NaN rewards (every function abstained)
    stay out of the means and get advantage 0. Returns (advantages, each group's std)."""
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    count = (~grouped.isnan()).sum(1, keepdim=True)
    variance = torch.nanmean((grouped - mean) ** 2, dim=1, keepdim=True) * count / (count - 1)
    group_std = torch.where(count > 1, variance, torch.full_like(variance, math.nan)).sqrt()
    advantages = grouped - mean
    if scale == "group":
        advantages = advantages / (group_std + STD_EPSILON)
    elif scale == "batch":
        advantages = advantages / (batch_std + STD_EPSILON)
    return torch.nan_to_num(advantages.flatten(), nan=0.0), group_std.flatten()


def global_std(values: torch.Tensor, context) -> torch.Tensor:
    """The standard deviation (Bessel-corrected, NaN ignored) of `values` over all ranks."""
    finite = ~values.isnan()
    sums = all_reduce_sum(torch.stack([values[finite].sum(), finite.sum().float()]), context)
    mean = sums[0] / sums[1]
    squares = all_reduce_sum(((values[finite] - mean) ** 2).sum().reshape(1), context)[0]
    return (squares / (sums[1] - 1)).sqrt()


def reward_sums(rewards: torch.Tensor, per_function: torch.Tensor) -> torch.Tensor:
    """What rollouts and evaluations average over all ranks: [sum of the scored totals (NaN: nobody scored), their
    count, each function's sum, each function's count (None: it abstained)]."""
    scored = ~rewards.isnan()
    return torch.cat([torch.stack([rewards[scored].sum(), scored.sum().float()]),
                      torch.nan_to_num(per_function).sum(0), (~per_function.isnan()).sum(0).float()])


def reward_means(sums: list[float], names: list[str], prefix: str) -> dict[str, float | None]:
    """`prefix` (the mean total reward) and `prefix_<function>` from the all-rank `reward_sums`; None for a function
    that abstained everywhere."""
    totals, counts = sums[2:2 + len(names)], sums[2 + len(names):]
    return {prefix: sums[0] / max(sums[1], 1),
            **{f"{prefix}_{name}": total / count if count else None
               for name, total, count in zip(names, totals, counts)}}


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 up to and including each row's first end token (all of a row that never ends), 0 after it."""
    is_end = completion_ids == eos_token_id
    width = completion_ids.shape[1]
    first_end = torch.where(is_end.any(1), is_end.int().argmax(1), torch.full_like(is_end[:, 0], width - 1,
                                                                                     dtype=torch.long))
    return (torch.arange(width, device=completion_ids.device)[None] <= first_end[:, None]).long()


class GRPORollout:
    """The rollout phase of the engine's loop: every `steps_per_rollout` steps it turns a batch of prompts into the
    step's micro-batches (completions with advantages), which the optimizer steps in between reuse. Its state (the
    current micro-batches and how often they are still used) goes into every checkpoint, so a run resumed between
    two rollouts continues exactly."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.section = section = trainer.config.rlhf
        self.functions = load_reward_functions(section.reward_functions)
        self.weights = section.reward_weights or [1.0] * len(self.functions)
        self.prompts_per_step, self.steps_per_rollout = section.prompts_per_step, section.num_iterations
        self.reference = reference_model(trainer) if section.beta > 0 else None
        # The task's prompt collator: validation prompts are padded as the training ones, with its padding token.
        self.collate = trainer.collate
        self.eos_token_id, self.pad_token_id = trainer.tokenizer.eos_token_id, trainer.collate.pad_token_id
        # Under FSDP every forward gathers weights from all ranks: all of them decode until the last one ends.
        self.synced = trainer.context.is_distributed and trainer.config.train.strategy == "fsdp"
        self.micro_batches: list[dict] = []
        self.remaining = 0
        self.last_metrics: dict = {}
        self.last_samples: list[dict] = []
        # One seed per rank (as TRL's device_specific seed): with the seed they share, the ranks would draw the same
        # random numbers and, while the policy is still flat, sample nearly the same tokens for different prompts.
        # Checkpoints keep every rank's generator state, so a resumed run continues the same streams.
        torch.manual_seed(trainer.config.train.seed + trainer.context.rank)

    # ------------------------------------------------------------------ generation

    def generation_config(self) -> GenerationConfig:
        # Greedy over the scores that the sampling processors leave: a sample.
        return GenerationConfig(max_new_tokens=self.section.max_completion_tokens, do_sample=False,
                                eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sample: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(completion ids [rows, width], completion mask): tokens after a row's end token are padding."""
        model, trainer = self.trainer.model, self.trainer
        training, saved_config = model.training, model.generation_config
        # generate fills what a config leaves unset from the model's own (a folder's repetition penalty, say):
        # the rollout's config stands in for it, so that nothing but the sampling processors shapes a draw.
        model.generation_config = config = self.generation_config()
        model.eval()
        try:
            with autocast(trainer.context.device, trainer.dtype):
                section = self.section
                draw = sampling_processors(section.temperature, section.top_k, section.top_p) if sample else None
                output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                        logits_processor=draw, synced_gpus=self.synced)
        finally:
            model.train(training)
            model.generation_config = saved_config
        completion_ids = output[:, input_ids.shape[1]:]
        if completion_ids.shape[1] == 0:
            completion_ids = torch.full_like(input_ids[:, :1], self.eos_token_id)
        mask = completion_mask(completion_ids, self.eos_token_id)
        return completion_ids.masked_fill(mask == 0, self.pad_token_id), mask

    def score(self, prompts: list, columns: dict[str, list], completion_ids: torch.Tensor, mask: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(weighted total [rows] with NaN where every function abstained, per function [rows, functions], texts)."""
        id_lists = [row[:length].tolist() for row, length in zip(completion_ids.cpu(), mask.sum(1).tolist())]
        texts = self.trainer.tokenizer.batch_decode(id_lists, skip_special_tokens=True)
        # As TRL passes them: a conversational prompt gets its completion as one assistant message.
        completions = [[{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
                       for prompt, text in zip(prompts, texts)]
        total, per_function = score_completions(self.functions, self.weights, prompts, completions, id_lists, columns)
        total = total.masked_fill(per_function.isnan().all(1), math.nan)
        return total.to(completion_ids.device), per_function.to(completion_ids.device), texts

    # ------------------------------------------------------------------ the rollout

    def step_batches(self, batches) -> list[dict]:
        """The micro-batches of the next optimizer step: a new rollout from the next prompt batch every
        `steps_per_rollout` steps, else the current one again."""
        if self.remaining == 0:
            self.micro_batches = self.rollout(next(batches))
            self.remaining = self.steps_per_rollout
        self.remaining -= 1
        return self.micro_batches

    def rollout(self, prompt_batch: dict) -> list[dict]:
        trainer, section = self.trainer, self.section
        group = section.num_generations
        prompt_ids = prompt_batch["input_ids"].repeat_interleave(group, 0)
        prompt_mask = prompt_batch["attention_mask"].repeat_interleave(group, 0)
        prompts = [prompt for prompt in prompt_batch["prompts"] for _ in range(group)]
        columns = {name: [value for value in values for _ in range(group)]
                   for name, values in prompt_batch["columns"].items()}
        completion_ids, mask = self.generate(prompt_ids, prompt_mask, sample=True)
        rewards, per_function, texts = self.score(prompts, columns, completion_ids, mask)
        batch_std = global_std(rewards, trainer.context) if section.scale_rewards == "batch" else None
        advantages, group_std = group_advantages(rewards, group, section.scale_rewards, batch_std)

        # Everything the step needs from all ranks in one reduction: its completions and tokens (the loss's
        # normaliser) and the sums behind the logged means.
        stds = group_std.nan_to_num()
        sums = torch.cat([torch.tensor([completion_ids.shape[0], mask.sum(), stds.sum(), (stds < 1e-6).sum(),
                                        stds.numel()], dtype=torch.float32, device=mask.device),
                          reward_sums(rewards, per_function)])
        rows, tokens, std_sum, zero_std, groups, *reward_totals = all_reduce_sum(sums, trainer.context).tolist()
        per_token = section.loss_type in ("bnpo", "dapo")
        metric_scale = (tokens if per_token else rows) / tokens
        micro_batches = []
        for start in range(0, completion_ids.shape[0], trainer.config.train.micro_batch_size):
            part = slice(start, start + trainer.config.train.micro_batch_size)
            attention = torch.cat([prompt_mask[part], mask[part]], dim=1)
            # Only the columns some row of this micro-batch uses: the rest is padding.
            first = int(attention.any(0).int().argmax())
            width = int(mask[part].any(0).sum())
            last = prompt_ids.shape[1] + width
            micro_batch = {"input_ids": torch.cat([prompt_ids[part], completion_ids[part]], 1)[:, first:last],
                           "attention_mask": attention[:, first:last], "completion_mask": mask[part, :width],
                           "advantages": advantages[part]}
            micro_batch["targets"] = int(micro_batch["completion_mask"].sum()) if per_token else micro_batch[
                "input_ids"].shape[0]
            micro_batch["metric_scale"] = metric_scale
            micro_batches.append(micro_batch)
        self.add_log_probabilities(micro_batches)
        self.last_metrics = {**reward_means(reward_totals, [name for name, _ in self.functions], "reward"),
                             "reward_std": std_sum / groups, "frac_reward_zero_std": zero_std / groups,
                             "completion_length": tokens / rows}
        self.last_samples = [{"prompt": prompt if isinstance(prompt, str) else prompt[-1]["content"],
                              "sample": text, "reward": None if math.isnan(reward) else reward}
                             for prompt, text, reward in list(zip(prompts, texts, rewards.tolist()))[:group]]
        return micro_batches

    @torch.no_grad()
    def add_log_probabilities(self, micro_batches: list[dict]) -> None:
        """The policy's log-probabilities at sampling time (needed when a rollout feeds several steps; with one, the
        loss takes them from its own forward) and the reference's (rlhf.beta > 0)."""
        trainer = self.trainer
        for micro_batch in micro_batches:
            with autocast(trainer.context.device, trainer.dtype):
                if self.steps_per_rollout > 1:
                    micro_batch["old_logps"] = token_logps(trainer.model, micro_batch, self.section.temperature)[0]
                if self.reference is not None:
                    micro_batch["reference_logps"] = self.reference_logps(micro_batch)

    def reference_logps(self, micro_batch: dict) -> torch.Tensor:
        model, adapters_off = self.reference
        training = model.training
        model.eval()
        try:
            with model.disable_adapter() if adapters_off else nullcontext():
                return token_logps(model, micro_batch, self.section.temperature)[0]
        finally:
            model.train(training)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        """One greedy completion per validation prompt (the first eval.max_batches x train.micro_batch_size, split
        over the ranks): `val_reward`, `val_reward_<function>`, and `val_accuracy` (share of exact answers) when
        the built-in `exact_answer` is among the functions."""
        trainer = self.trainer
        context, dataset = trainer.context, trainer.val_dataset
        count = min(len(dataset), trainer.config.eval.max_batches * trainer.config.train.micro_batch_size)
        count -= count % context.world_size  # every rank decodes the same number of batches (FSDP needs it)
        indices = list(range(context.rank, count, context.world_size))
        chunk = self.section.prompts_per_step * self.section.num_generations
        names = [name for name, _ in self.functions]
        sums = torch.zeros(3 + 2 * len(names), device=context.device)  # exact answers, then reward_sums
        for start in range(0, len(indices), chunk):
            batch = model_inputs(self.collate([dataset[index] for index in indices[start:start + chunk]]),
                                 context.device)
            completion_ids, mask = self.generate(batch["input_ids"], batch["attention_mask"], sample=False)
            rewards, per_function, _ = self.score(batch["prompts"], batch["columns"], completion_ids, mask)
            exact = (per_function[:, names.index("exact_answer")] == 1).float().sum() if "exact_answer" in names \
                else torch.zeros((), device=context.device)
            sums += torch.cat([exact.reshape(1), reward_sums(rewards, per_function)])
        exact, *reward_totals = all_reduce_sum(sums, context).tolist()
        evaluation = reward_means(reward_totals, names, "val_reward")
        if "exact_answer" in names:
            evaluation["val_accuracy"] = exact / max(count, 1)
        return evaluation

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Collective: the micro-batches still to be used, of every rank (a resumed run cannot sample them again)."""
        batches = [] if self.remaining == 0 else [
            {key: value.tolist() if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
            for batch in self.micro_batches]
        return {"remaining": self.remaining, "metrics": self.last_metrics,
                "micro_batches": all_gather_objects(batches, self.trainer.context)}

    def load_state_dict(self, state: dict) -> None:
        self.remaining, self.last_metrics = state["remaining"], state["metrics"]
        device = self.trainer.context.device
        if self.remaining:
            types = {"input_ids": torch.long, "attention_mask": torch.long, "completion_mask": torch.long}
            self.micro_batches = [
                {key: torch.tensor(value, dtype=types.get(key, torch.float32), device=device)
                 if isinstance(value, list) else value for key, value in batch.items()}
                for batch in state["micro_batches"][self.trainer.context.rank]]


def grpo_rollout(trainer) -> GRPORollout:
    return GRPORollout(trainer)
