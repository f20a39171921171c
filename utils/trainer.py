"""The one training engine, shared by pretraining, SFT and the stages after them.

A `Task` supplies what differs between stages: its datasets, its collator, its loss (and how many targets a batch
holds). `Trainer(config, task, resume)` builds everything else in its constructor: distributed set-up, tokenizer,
data, model, optimizer and schedule, the resumed state. `fit()` runs the loop, one `train_step` per optimizer step,
then writes the final model.
"""

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from model import ByteModel, ByteModelConfig, enable_activation_checkpointing
from utils.batches import TrainBatches, evaluation_batches
from utils.checkpoint import CheckpointManager, load_starting_model, resume_mismatch, set_rng_state
from utils.config import (TrainingConfig, check_training_config, config_to_dict, model_config_from, parse_config,
                          resolve_tokenizer, save_config)
from utils.counting import flops_per_token, measure_peak_flops
from utils.distributed import (all_reduce_sum, any_rank, barrier, gradient_sync, init_distributed, main_first, teardown,
                               wrap_model)
from utils.errors import InputError, error_summary, exit_on_input_error, out_of_memory_as_input_error
from utils.expert_parallel import ExpertParallel
from utils.graceful_stop import GracefulStop
from utils.logger import quiet_transformers, setup_logger
from utils.lora import add_lora
from utils.metrics import perplexity
from utils.metrics_writer import MetricsWriter
from utils.optim import build_optimizer, build_scheduler
from utils.precision import autocast, resolve_compile, resolve_precision
from utils.progressbar import ProgressBar
from utils.router_monitor import RouterMonitor
from utils.samples import greedy_samples
from utils.task import Task

# How a run stopped by too many non-finite steps in a row says so (the script then exits with 1).
STOPPED_BY_BAD_STEPS = "non-finite steps in a row"


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint (with the schedule and data position) and restored on resume."""
    step: int = 0
    tokens_seen: int = 0
    best_metric: float | None = None  # of the task's selection metric (val_loss unless the task names another)
    evals_without_improvement: int = 0
    bad_steps: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        if "best_val_loss" in state:  # the name before tasks could select on another metric
            state["best_metric"] = state.pop("best_val_loss")
        for key, value in state.items():
            setattr(self, key, value)


class Trainer:
    def __init__(self, config: TrainingConfig, task: Task, resume: str | None = None):
        check_training_config(config)
        self.config, self.task = config, task.variant(config) if task.variant else task
        self.context = context = init_distributed(config.train.device)
        self.out_dir = Path(config.train.out_dir)
        self.log = setup_logger(self.out_dir / "train.log", context.rank)
        quiet_transformers(errors_only=False)
        try:
            self.build(resume)
        except BaseException:
            teardown(context, wait=False)  # the other ranks may never reach a barrier after a failure
            raise

    def build(self, resume: str | None) -> None:
        config, context, log = self.config, self.context, self.log
        torch.manual_seed(config.train.seed)
        self.dtype = resolve_precision(config.train.precision, context.device)
        self.expert_parallel = (ExpertParallel(config.train.expert_parallel_size, context)
                                if config.train.expert_parallel_size > 1 else None)
        self.checkpoints = CheckpointManager(self.out_dir, config.checkpoint.keep_last, context, self.expert_parallel)
        if resume is None and self.checkpoints.step_folders():
            raise InputError(f"{self.checkpoints.root} already holds checkpoints: pass --resume auto to continue, "
                             f"or choose another train.out_dir")
        config.data.tokenizer = resolve_tokenizer(config)
        self.tokenizer = AutoTokenizer.from_pretrained(config.data.tokenizer)
        # Rank 0 tokenizes and caches the data first; the others then read the finished cache.
        self.train_dataset, self.val_dataset = main_first(
            lambda: self.task.datasets(self.tokenizer, config, log.info), context, (InputError,))
        self.collate = self.task.collator(self.tokenizer)
        with out_of_memory_as_input_error():
            model = self.build_model(self.tokenizer)
            if self.expert_parallel:
                self.expert_parallel.shard(model)
            self.model = model = model.to(context.device)
        if config.train.gradient_checkpointing:
            enable_activation_checkpointing(model)
        self.rollout = self.task.rollout(self) if self.task.rollout else None
        self.batches = TrainBatches(self.train_dataset, self.collate, config.data, config.train, context,
                                    self.rollout.prompts_per_step if self.rollout else None)
        if self.rollout:
            steps_per_epoch = self.batches.steps_per_epoch(1) * self.rollout.steps_per_rollout
        else:
            steps_per_epoch = self.batches.steps_per_epoch(config.train.grad_accum_steps)
        if steps_per_epoch is None and config.train.max_steps is None:
            raise InputError("data.streaming needs train.max_steps (a stream has no known epoch length)")
        self.total_steps = config.train.max_steps or config.train.epochs * steps_per_epoch
        param_dtype = self.dtype if self.dtype != torch.float32 else None
        self.wrapped = (self.expert_parallel.wrap(model, config.train.strategy, param_dtype) if self.expert_parallel
                        else wrap_model(model, config.train.strategy, context, param_dtype=param_dtype))
        self.optimizer = build_optimizer(self.wrapped, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim, self.total_steps)
        self.scaler = torch.amp.GradScaler(enabled=self.dtype == torch.float16)  # fp16 only
        compiled = resolve_compile(config.train.compile, context.device, self.dtype, model)
        self.forward_model = torch.compile(self.wrapped) if compiled else self.wrapped
        shapes = ByteModelConfig.from_llama_family(model.config)
        self.flops_per_token = sum(flops_per_token(shapes, config.data.seq_len).values())
        self.peak_flops = measure_peak_flops(context.device, self.dtype) * context.world_size
        self.router = RouterMonitor(model, context)
        self.state, saved_rng = TrainState(), None
        if resume is not None:
            loaded = self.checkpoints.load(resume, self.wrapped, self.optimizer,
                                           lambda saved: resume_mismatch(saved, config_to_dict(config),
                                                                         config_to_dict(type(config)())))
            if loaded is not None:
                _, state, saved_rng = loaded
                self.scheduler.load_state_dict(state.pop("scheduler"))
                self.batches.load_state_dict(state.pop("sampler"))
                if self.rollout:
                    self.rollout.load_state_dict(state.pop("rollout"))
                self.state.load_state_dict(state)
        self.loss = self.task.objective(self)
        if context.is_main:
            save_config(config, self.out_dir / "config.yaml")
        self.metrics = MetricsWriter(self.out_dir, context.is_main, config.logging.swanlab_mode, config.logging.project,
                                     config_to_dict(config), self.state.step if resume is not None else None)
        parameters = sum(parameter.numel() for parameter in model.parameters())
        trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
        data = (f"{len(self.train_dataset)} training samples, {steps_per_epoch} steps per epoch"
                if steps_per_epoch else "streamed training data, unknown steps per epoch")
        log.info(f"tokenizer: {config.data.tokenizer}; model: {parameters / 1e6:.2f}M parameters "
                 f"({trainable / 1e6:.2f}M trainable); {data}, {self.total_steps} steps; precision {self.dtype}; "
                 f"{context.world_size} process(es), {config.train.strategy}; device {context.device}"
                 f"{'; compiled' if compiled else ''}")
        if self.expert_parallel:
            log.info(self.expert_parallel.describe())
        if saved_rng is not None:
            set_rng_state(saved_rng)  # last, so that nothing between restore and training draws from it

    def build_model(self, tokenizer) -> nn.Module:
        section = self.config.model
        model = (load_starting_model(section.init_from, section.attn_implementation) if section.init_from
                 else ByteModel(model_config_from(section, tokenizer)))
        if self.config.data.seq_len > model.config.max_position_embeddings:
            raise InputError(f"data.seq_len={self.config.data.seq_len} exceeds the model's "
                             f"max_position_embeddings={model.config.max_position_embeddings}")
        return add_lora(model, self.config.lora) if self.config.lora.enabled else model

    # ------------------------------------------------------------------ the run

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, float, bool]:
        """Accumulate over the micro-batches, clip, step (skipped when the loss or gradient is not finite).
        Returns (mean loss over ranks, gradient norm, whether the weights were updated)."""
        context, model, optimizer = self.context, self.wrapped, self.optimizer
        # Normalise by the targets of the whole step on all ranks, so every token weighs the same however they
        # fall into micro-batches and ranks (DDP/FSDP average gradients over ranks, hence * world size).
        targets = all_reduce_sum(torch.tensor([float(sum(map(self.task.targets, micro_batches)))]), context)
        num_items = targets.item() / context.world_size
        step_loss = torch.zeros((), device=context.device)
        metric_sums = torch.zeros(len(self.task.metrics), device=context.device)
        model.train()
        for index, batch in enumerate(micro_batches):
            with gradient_sync(model, index == len(micro_batches) - 1), autocast(context.device, self.dtype):
                outputs = self.loss(self.forward_model, batch, num_items)
            self.router.after_forward(outputs)
            self.scaler.scale(outputs.loss).backward()
            step_loss += outputs.loss.detach()
            metric_sums += self.task_metrics(outputs)
        step_loss = (all_reduce_sum(step_loss.float(), context) / context.world_size).item()
        metric_means = (all_reduce_sum(metric_sums, context) / targets.to(context.device)).tolist()
        self.step_metrics = dict(zip(self.task.metrics, metric_means))
        if self.expert_parallel:
            self.expert_parallel.reduce_gradients()
        self.scaler.unscale_(optimizer)
        if self.expert_parallel:
            grad_norm = self.expert_parallel.clip_gradients(model, self.config.optim.grad_clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.config.optim.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
        if finite:
            self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        self.router.after_step(model, applied=finite)
        self.scheduler.step()
        return step_loss, grad_norm, finite

    def fit(self) -> dict:
        """Train to the end (or an early stop, a signal, too many bad steps); write final/ when the run ended
        normally. Returns a summary: final step, losses, why it stopped. Raises InputError for bad input."""
        config, state, log = self.config, self.state, self.log
        batches = iter(self.batches)
        losses, last_eval, reason, bad_in_row = [], None, "finished", 0
        self.start = self.window_start = time.perf_counter()
        self.window_tokens = 0
        self.window_rollout_s = self.window_update_s = 0.0
        failed = True
        try:
            with out_of_memory_as_input_error(), GracefulStop() as stop, \
                    ProgressBar(self.total_steps, enabled=self.context.is_main, start=state.step) as progress:
                if self.val_dataset is not None and config.eval.at_start and state.step == 0:
                    self.evaluate()
                while state.step < self.total_steps:
                    if any_rank(stop.requested, self.context):
                        reason = "stopped by signal"
                        self.save()
                        break
                    if self.rollout:
                        rollout_start = time.perf_counter()
                        micro_batches = self.rollout.step_batches(batches)
                        self.window_rollout_s += time.perf_counter() - rollout_start
                    else:
                        micro_batches = [next(batches) for _ in range(config.train.grad_accum_steps)]
                    update_start = time.perf_counter()
                    loss, grad_norm, finite = self.train_step(micro_batches)
                    self.window_update_s += time.perf_counter() - update_start
                    state.step += 1
                    step_tokens = sum(batch["input_ids"].numel() for batch in micro_batches) * self.context.world_size
                    state.tokens_seen += step_tokens
                    self.window_tokens += step_tokens
                    bad_in_row = 0 if finite else bad_in_row + 1
                    if finite:
                        losses.append(loss)
                    else:
                        state.bad_steps += 1
                        log.warning(f"step {state.step}: non-finite loss or gradient, step skipped "
                                    f"({bad_in_row} in a row, {state.bad_steps} in total)")
                    if bad_in_row >= config.train.max_bad_steps:
                        # The skipped steps never changed the weights, so this saves the last good state.
                        self.save()
                        reason = f"{bad_in_row} {STOPPED_BY_BAD_STEPS}"
                        log.error(f"stopping: {reason}; the last good state is saved in {self.checkpoints.latest()}. "
                                  f"Lower optim.lr, check the data, or use train.precision=fp32")
                        break
                    last = state.step == self.total_steps
                    if state.step % config.logging.every_steps == 0 or last:
                        self.log_step(progress, loss if finite else None, grad_norm if finite else None)
                    if self.val_dataset is not None and (state.step % config.eval.every_steps == 0 or last):
                        last_eval = self.evaluate()
                        if self.early_stop(last_eval):
                            reason = "early stopping"
                            self.save()
                            break
                    if state.step % config.checkpoint.every_steps == 0 or last:
                        self.save()
            if reason in ("finished", "early stopping"):
                self.save_final()
            failed = False
        finally:
            self.metrics.close()
            teardown(self.context, wait=not failed)
        return {"step": state.step, "reason": reason, "losses": losses, "last_eval": last_eval,
                "best_metric": state.best_metric, "bad_steps": state.bad_steps, "tokens_seen": state.tokens_seen}

    def log_step(self, progress: ProgressBar, loss: float | None, grad_norm: float | None) -> None:
        """A metrics row for this step; throughput and the router's figures cover the steps since the last row."""
        window_s = max(time.perf_counter() - self.window_start, 1e-9)
        tokens_per_s = self.window_tokens / window_s
        row = {"step": self.state.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
               "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * self.flops_per_token / self.peak_flops,
               "tokens_seen": self.state.tokens_seen, "elapsed_s": time.perf_counter() - self.start,
               **self.step_metrics, **self.router.metrics(),
               **(self.expert_parallel.metrics() if self.expert_parallel else {})}
        if self.rollout:
            # Sampling and scoring against the optimizer steps: seconds over the steps since the last row.
            row.update(self.rollout.last_metrics, rollout_s=self.window_rollout_s, update_s=self.window_update_s)
        self.metrics.write(row)
        shown = {name: self.step_metrics[name] for name in self.task.progress_metrics}
        progress.update(self.state.step, loss=loss if loss is not None else float("nan"), lr=row["lr"],
                        tok_s=round(tokens_per_s), **shown)
        self.window_tokens, self.window_start = 0, time.perf_counter()
        self.window_rollout_s = self.window_update_s = 0.0

    def save(self) -> None:
        trainer_state = {**self.state.state_dict(), "scheduler": self.scheduler.state_dict(),
                         "sampler": self.batches.state_dict()}
        if self.rollout:
            trainer_state["rollout"] = self.rollout.state_dict()
        self.checkpoints.save(self.state.step, self.wrapped, self.optimizer, trainer_state, config_to_dict(self.config))

    def early_stop(self, evaluation: dict) -> bool:
        """Record an evaluation (a new best is saved to checkpoints/best/); True when patience has run out."""
        config, state = self.config.eval, self.state
        name, higher_is_better = self.task.selection
        sign = -1 if higher_is_better else 1  # compared as a loss: lower is better
        if state.best_metric is None or sign * evaluation[name] < sign * state.best_metric - config.min_delta:
            state.best_metric, state.evals_without_improvement = evaluation[name], 0
            self.checkpoints.save_best(self.wrapped, {"step": state.step, **evaluation})
            return False
        state.evals_without_improvement += 1
        if config.patience and state.evals_without_improvement >= config.patience:
            self.log.info(f"early stopping: no improvement of {name} by more than {config.min_delta} in "
                          f"{config.patience} evaluations (best {state.best_metric:.4f})")
            return True
        return False

    def evaluate(self) -> dict[str, float]:
        """The task's own evaluation, or the validation loss; written to metrics, with samples and plots."""
        evaluation = self.task.evaluate(self) if self.task.evaluate else self.validation_loss()
        self.metrics.write({"step": self.state.step, **evaluation, "tokens_seen": self.state.tokens_seen,
                            "elapsed_s": time.perf_counter() - self.start})
        figures = ", ".join(f"{key} {value:.4f}" for key, value in evaluation.items() if value is not None)
        self.log.info(f"step {self.state.step}: {figures}")
        # A sharded model generates only with every rank taking part; otherwise rank 0 writes alone.
        if self.context.is_main or self.expert_parallel or (self.context.is_distributed
                                                            and self.config.train.strategy == "fsdp"):
            self.write_samples(self.model)
        if self.rollout and self.context.is_main and self.rollout.last_samples:
            self.metrics.write_sample_rows(self.state.step, self.rollout.last_samples)
        self.refresh_plots()
        return evaluation

    @torch.no_grad()
    def validation_loss(self) -> dict[str, float]:
        """Target-weighted mean loss over the first `eval.max_batches` validation batches."""
        model, context = self.forward_model, self.context
        model.eval()
        totals = torch.zeros(2 + len(self.task.metrics), device=context.device)
        for batch in evaluation_batches(self.val_dataset, self.collate, self.config.eval.max_batches,
                                        self.config.train.micro_batch_size, self.config.data.num_workers,
                                        self.config.train.seed, context):
            targets = self.task.targets(batch)
            with autocast(context.device, self.dtype):
                outputs = self.loss(model, batch, None)
            count = torch.tensor(float(targets), device=context.device)
            totals += torch.cat([torch.stack([outputs.loss.float() * targets, count]), self.task_metrics(outputs)])
        all_reduce_sum(totals, context)
        means = (totals / totals[1].clamp(min=1)).tolist()
        evaluation = {"val_loss": means[0]}
        if self.task.perplexity:
            evaluation["val_ppl"] = perplexity(means[0])
        evaluation.update({f"val_{name}": value for name, value in zip(self.task.metrics, means[2:])})
        return evaluation

    def write_samples(self, model: nn.Module, final: bool = False) -> None:
        """Greedy continuations of eval.sample_prompts (chat stages: replies) to the console, samples.jsonl and
        swanlab."""
        prompts = self.config.eval.sample_prompts
        if not prompts:
            return
        logging = self.config.logging
        samples = greedy_samples(model, self.tokenizer, prompts, logging.sample_tokens, chat=self.task.chat_sample,
                                 repetition_penalty=logging.sample_repetition_penalty)
        if self.context.is_main:
            self.metrics.write_samples(self.state.step, prompts, samples, final)
            for prompt, sample in zip(prompts, samples):
                self.log.info(f"{'final' if final else f'step {self.state.step}'} sample: {prompt!r} -> {sample!r}")

    def refresh_plots(self) -> None:
        """Redraw out_dir/plots/ from metrics.jsonl (rank 0). A figure that fails to draw costs a warning, never
        the run."""
        if not self.context.is_main or not self.config.logging.plots:
            return
        from utils.plots import plot_run  # here: matplotlib would add most of a second to every script's start

        try:
            plot_run(self.out_dir)
        except Exception as error:  # plotting is a view of the run, not part of it
            self.log.warning(f"plots not refreshed: {error_summary(error)}")

    def task_metrics(self, outputs) -> torch.Tensor:
        """The task's metric sums of one batch, in the order of `task.metrics`."""
        if not self.task.metrics:
            return torch.zeros(0, device=self.context.device)
        return torch.stack([outputs.metrics[name].detach().float() for name in self.task.metrics])

    def save_final(self) -> None:
        """final/ (see CheckpointManager.save_final); then, on rank 0, a sample from it and the task's evaluation."""
        tokenizer, logging = self.tokenizer, self.config.logging
        generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.8, top_p=0.9,
            max_new_tokens=logging.sample_tokens)
        final = self.checkpoints.save_final(self.wrapped, tokenizer, generation_config, self.out_dir / "final")
        if self.context.is_main:
            self.write_samples(AutoModelForCausalLM.from_pretrained(final), final=True)  # as its users will load it
            row = self.task.evaluate_final(final, self.config) if self.task.evaluate_final else {}
            if row:
                self.metrics.write({"step": self.state.step, **row})
            self.refresh_plots()
        barrier(self.context)


def run_training(task: Task, default_config: str, description: str, argv: list[str] | None = None) -> dict:
    """A training script's main: parse the config and `--resume`, train, exit 1 when bad steps stopped the run
    (input errors exit 2, with one line)."""

    def add_arguments(parser) -> None:
        parser.add_argument("--resume", default=None, metavar="auto|PATH",
                            help="continue from the latest checkpoint in train.out_dir (auto) or from a step folder")

    @exit_on_input_error
    def main() -> dict:
        config, arguments = parse_config(task.config_type, default_config, description, argv, add_arguments)
        summary = Trainer(config, task, arguments.resume).fit()
        if summary["reason"].endswith(STOPPED_BY_BAD_STEPS):
            raise SystemExit(1)
        return summary

    return main()
