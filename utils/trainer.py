"""The one training engine, shared by pretraining, SFT and the stages after them.

A `Task` supplies what differs between stages: its datasets, its collator, its loss (and how many targets a batch
holds). `Trainer(config, task, resume)` builds everything else in its constructor: distributed set-up, tokenizer,
data, model, optimizer and schedule, the resumed state. `fit()` runs the loop, one `train_step` per optimizer step,
then writes the final model.
"""

import contextlib
import dataclasses
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from model import ByteModel, ByteModelConfig, count_targets, enable_activation_checkpointing
from utils.batches import TrainBatches, evaluation_batches
from utils.checkpoint import CheckpointManager, is_peft_model, publish_folder, set_rng_state
from utils.config import TrainingConfig, config_to_dict, model_config_from, parse_config, save_config
from utils.counting import flops_per_token, measure_peak_flops
from utils.distributed import all_reduce_sum, any_rank, barrier, init_distributed, main_first, teardown, unwrap_model, \
    wrap_model
from utils.errors import InputError, error_summary, exit_on_input_error
from utils.graceful_stop import GracefulStop
from utils.logger import get_logger, quiet_transformers, setup_logger
from utils.metrics import perplexity
from utils.metrics_writer import MetricsWriter
from utils.optim import build_optimizer, build_scheduler
from utils.precision import autocast, resolve_compile, resolve_precision
from utils.progressbar import ProgressBar
from utils.router_monitor import RouterMonitor

# Keys that must match for a checkpoint to continue this run exactly (anything else may change on resume).
RESUME_KEYS = {"model": None, "lora": None, "data": ("train_files", "seq_len", "tokenizer", "streaming"),
               "train": ("micro_batch_size", "grad_accum_steps", "seed")}
STOPPED_BY_BAD_STEPS = "non-finite steps in a row"


def language_model_loss(model: nn.Module, batch: dict[str, torch.Tensor], num_items_in_batch: float | None):
    """Next-token cross-entropy on the batch's labels (a sum over `num_items_in_batch` targets when given)."""
    return model(**batch, num_items_in_batch=num_items_in_batch)


def label_targets(batch: dict[str, torch.Tensor]) -> int:
    return int(count_targets(batch.get("labels"), batch.get("shift_labels")))


@dataclass(frozen=True)
class Task:
    """What a training stage supplies. `datasets(tokenizer, config, log)` returns (train, validation or None);
    `collator(tokenizer)` the collate function (None: default collation); `loss(model, batch, num_items_in_batch)`
    model outputs with `.loss`; `targets(batch)` the targets the loss is normalised by. `evaluate_final(folder,
    config)` (optional) measures the final model on rank 0 and returns a metrics row."""
    datasets: Callable[..., tuple[Any, Any]]
    collator: Callable[[Any], Callable | None] = lambda tokenizer: None
    loss: Callable[..., Any] = language_model_loss
    targets: Callable[[dict], int] = label_targets
    chat_sample: bool = False  # render the closing sample prompt as a user turn of the chat template
    evaluate_final: Callable[[Path, TrainingConfig], dict] | None = None


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint (with the schedule and data position) and restored on resume."""
    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float | None = None
    evals_without_improvement: int = 0
    bad_steps: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def check_config(config: TrainingConfig) -> None:
    """What the typed config cannot say: ranges and combinations."""
    for key in ("train.micro_batch_size", "train.grad_accum_steps", "checkpoint.every_steps", "eval.every_steps",
                "logging.every_steps", "train.max_bad_steps", "train.epochs"):
        section, name = key.split(".")
        if getattr(getattr(config, section), name) < 1:
            raise InputError(f"{key} must be >= 1, got {getattr(getattr(config, section), name)}")
    if config.train.max_steps is not None and config.train.max_steps < 1:
        raise InputError(f"train.max_steps must be >= 1 or null, got {config.train.max_steps}")
    if not 0 <= config.optim.min_lr <= config.optim.lr:
        raise InputError(f"optim.min_lr must be in [0, optim.lr], got {config.optim.min_lr}")
    lora = config.lora
    if lora.enabled:
        if lora.rank < 1 or lora.alpha <= 0 or not 0 <= lora.dropout < 1:
            raise InputError("lora needs rank >= 1, alpha > 0 and 0 <= dropout < 1")
        if not lora.target_modules:
            raise InputError("lora.target_modules is empty")
        if config.train.strategy == "fsdp":
            raise InputError("LoRA runs with train.strategy=ddp (the adapters are small: sharding them gains nothing)")


def resume_mismatch(saved: dict, current: dict) -> str | None:
    """Why a checkpoint saved with config `saved` cannot continue a run with config `current` exactly, or None."""
    if current["data"]["streaming"] and saved["data"].get("num_workers") != current["data"]["num_workers"]:
        # The stream is dealt to one shard per process and worker; the saved positions are per shard.
        return (f"data.num_workers was {saved['data'].get('num_workers')!r}, this run has "
                f"{current['data']['num_workers']!r} (a stream resumes only with the same shards)")
    for section, keys in RESUME_KEYS.items():
        for key in keys or current[section]:
            if saved.get(section, {}).get(key) != current[section][key]:
                return f"{section}.{key} was {saved.get(section, {}).get(key)!r}, this run has {current[section][key]!r}"
    return None


def gradient_sync(model: nn.Module, sync: bool):
    """Only the last micro-batch of a step all-reduces gradients; the others accumulate locally."""
    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


@contextlib.contextmanager
def out_of_memory_as_input_error():
    try:
        yield
    except torch.OutOfMemoryError:
        raise InputError("out of memory: lower train.micro_batch_size (raise train.grad_accum_steps to keep the "
                         "batch), lower data.seq_len, set train.gradient_checkpointing=true, or use "
                         "train.precision=bf16 or train.strategy=fsdp") from None


class Trainer:
    def __init__(self, config: TrainingConfig, task: Task, resume: str | None = None):
        check_config(config)
        self.config, self.task = config, task
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
        self.checkpoints = CheckpointManager(self.out_dir, config.checkpoint.keep_last, context)
        if resume is None and self.checkpoints.step_folders():
            raise InputError(f"{self.checkpoints.root} already holds checkpoints: pass --resume auto to continue, "
                             f"or choose another train.out_dir")
        config.data.tokenizer = self.resolve_tokenizer()
        self.tokenizer = AutoTokenizer.from_pretrained(config.data.tokenizer)
        # Rank 0 tokenizes and caches the data first; the others then read the finished cache.
        train_dataset, self.val_dataset = main_first(lambda: self.task.datasets(self.tokenizer, config, log.info),
                                                     context, (InputError,))
        self.collate = self.task.collator(self.tokenizer)
        with out_of_memory_as_input_error():
            self.model = model = self.build_model(self.tokenizer).to(context.device)
        if config.train.gradient_checkpointing:
            enable_activation_checkpointing(model)
        self.batches = TrainBatches(train_dataset, self.collate, config.data, config.train, context)
        steps_per_epoch = self.batches.steps_per_epoch(config.train.grad_accum_steps)
        if steps_per_epoch is None and config.train.max_steps is None:
            raise InputError("data.streaming needs train.max_steps (a stream has no known epoch length)")
        self.total_steps = config.train.max_steps or config.train.epochs * steps_per_epoch
        self.wrapped = wrap_model(model, config.train.strategy, context,
                                  param_dtype=self.dtype if self.dtype != torch.float32 else None)
        self.optimizer = build_optimizer(self.wrapped, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim, self.total_steps)
        compiled = resolve_compile(config.train.compile, context.device, self.dtype, model)
        self.forward_model = torch.compile(self.wrapped) if compiled else self.wrapped
        shapes = ByteModelConfig.from_llama_family(model.config)
        self.flops_per_token = sum(flops_per_token(shapes, config.data.seq_len).values())
        self.peak_flops = measure_peak_flops(context.device, self.dtype) * context.world_size
        self.router = RouterMonitor(model, context)
        self.state, saved_rng = TrainState(), None
        if resume is not None:
            loaded = self.checkpoints.load(resume, self.wrapped, self.optimizer,
                                           lambda saved: resume_mismatch(saved, config_to_dict(config)))
            if loaded is not None:
                _, state, saved_rng = loaded
                self.scheduler.load_state_dict(state.pop("scheduler"))
                self.batches.load_state_dict(state.pop("sampler"))
                self.state.load_state_dict(state)
        if context.is_main:
            save_config(config, self.out_dir / "config.yaml")
        self.metrics = MetricsWriter(self.out_dir, context.is_main, config.logging.swanlab_mode, config.logging.project,
                                     config_to_dict(config), self.state.step if resume is not None else None)
        parameters = sum(parameter.numel() for parameter in model.parameters())
        trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
        data = (f"{len(train_dataset)} training samples, {steps_per_epoch} steps per epoch"
                if steps_per_epoch else "streamed training data, unknown steps per epoch")
        log.info(f"tokenizer: {config.data.tokenizer}; model: {parameters / 1e6:.2f}M parameters "
                 f"({trainable / 1e6:.2f}M trainable); {data}, {self.total_steps} steps; precision {self.dtype}; "
                 f"{context.world_size} process(es), {config.train.strategy}; device {context.device}"
                 f"{'; compiled' if compiled else ''}")
        if saved_rng is not None:
            set_rng_state(saved_rng)  # last, so that nothing between restore and training draws from it

    def resolve_tokenizer(self) -> str:
        """An explicit data.tokenizer; else the starting model's own (model.init_from), else the demo tokenizer."""
        explicit, init_from = self.config.data.tokenizer, self.config.model.init_from
        if explicit is not None:
            if not Path(explicit).is_dir():
                raise InputError(f"data.tokenizer: folder not found: {explicit}")
            return explicit
        if init_from is None:
            return "tokenizer"
        if not Path(init_from).is_dir():
            raise InputError(f"model.init_from: folder not found: {init_from}")
        if not any((Path(init_from) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            raise InputError(f"model.init_from {init_from} holds no tokenizer: set data.tokenizer to the one its "
                             f"model was trained with")
        return init_from

    def build_model(self, tokenizer) -> nn.Module:
        section, lora = self.config.model, self.config.lora
        if section.init_from:
            if not Path(section.init_from).is_dir():
                raise InputError(f"model.init_from: folder not found: {section.init_from}")
            model = AutoModelForCausalLM.from_pretrained(section.init_from, dtype=torch.float32)
            try:
                ByteModelConfig.from_llama_family(model.config)
            except ValueError as error:
                raise InputError(f"model.init_from: {error}") from None
        else:
            model = ByteModel(model_config_from(section, tokenizer))
        if self.config.data.seq_len > model.config.max_position_embeddings:
            raise InputError(f"data.seq_len={self.config.data.seq_len} exceeds the model's "
                             f"max_position_embeddings={model.config.max_position_embeddings}")
        if not lora.enabled:
            return model
        from peft import LoraConfig, get_peft_model

        try:
            return get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                    target_modules=lora.target_modules, task_type="CAUSAL_LM"))
        except ValueError as error:
            raise InputError(f"lora: {error_summary(error)}") from None

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
        model.train()
        for index, batch in enumerate(micro_batches):
            with gradient_sync(model, index == len(micro_batches) - 1), autocast(context.device, self.dtype):
                outputs = self.task.loss(self.forward_model, batch, num_items)
            self.router.after_forward(outputs)
            self.scaler.scale(outputs.loss).backward()
            step_loss += outputs.loss.detach()
        step_loss = (all_reduce_sum(step_loss.float(), context) / context.world_size).item()
        self.scaler.unscale_(optimizer)
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
        self.scaler = torch.amp.GradScaler(enabled=self.dtype == torch.float16)
        batches = iter(self.batches)
        losses, last_eval, reason, bad_in_row = [], None, "finished", 0
        start = window_start = time.perf_counter()
        window_tokens = 0
        failed = True
        try:
            with out_of_memory_as_input_error(), GracefulStop() as stop, \
                    ProgressBar(self.total_steps, enabled=self.context.is_main, start=state.step) as progress:
                while state.step < self.total_steps:
                    if any_rank(stop.requested, self.context):
                        reason = "stopped by signal"
                        self.save()
                        break
                    micro_batches = [next(batches) for _ in range(config.train.grad_accum_steps)]
                    loss, grad_norm, finite = self.train_step(micro_batches)
                    state.step += 1
                    step_tokens = sum(batch["input_ids"].numel() for batch in micro_batches) * self.context.world_size
                    state.tokens_seen += step_tokens
                    window_tokens += step_tokens
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
                        tokens_per_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                        row = {"step": state.step, "loss": loss if finite else None,
                               "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm if finite else None,
                               "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * self.flops_per_token / self.peak_flops,
                               "elapsed_s": time.perf_counter() - start, **self.router.metrics()}
                        self.metrics.write(row)
                        progress.update(state.step, loss=row["loss"] or float("nan"), lr=row["lr"],
                                        tok_s=round(tokens_per_s))
                        window_tokens, window_start = 0, time.perf_counter()
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
                "best_val_loss": state.best_val_loss, "bad_steps": state.bad_steps, "tokens_seen": state.tokens_seen}

    def save(self) -> None:
        trainer_state = {**self.state.state_dict(), "scheduler": self.scheduler.state_dict(),
                         "sampler": self.batches.state_dict()}
        self.checkpoints.save(self.state.step, self.wrapped, self.optimizer, trainer_state, config_to_dict(self.config))

    def early_stop(self, evaluation: dict) -> bool:
        """Record an evaluation (a new best is saved to checkpoints/best/); True when patience has run out."""
        config, state = self.config.eval, self.state
        if state.best_val_loss is None or evaluation["val_loss"] < state.best_val_loss - config.min_delta:
            state.best_val_loss, state.evals_without_improvement = evaluation["val_loss"], 0
            self.checkpoints.save_best(self.wrapped, {"step": state.step, **evaluation})
            return False
        state.evals_without_improvement += 1
        if config.patience and state.evals_without_improvement >= config.patience:
            self.log.info(f"early stopping: no improvement of val_loss by more than {config.min_delta} in "
                          f"{config.patience} evaluations (best {state.best_val_loss:.4f})")
            return True
        return False

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Target-weighted mean loss over the first `eval.max_batches` validation batches; written to metrics."""
        model, context = self.forward_model, self.context
        model.eval()
        totals = torch.zeros(2, device=context.device)
        for batch in evaluation_batches(self.val_dataset, self.collate, self.config.eval.max_batches,
                                        self.config.train.micro_batch_size, self.config.data.num_workers,
                                        self.config.train.seed, context):
            targets = self.task.targets(batch)
            with autocast(context.device, self.dtype):
                loss = self.task.loss(model, batch, None).loss
            totals += torch.stack([loss.float() * targets, torch.tensor(float(targets), device=loss.device)])
        all_reduce_sum(totals, context)
        val_loss = (totals[0] / totals[1].clamp(min=1)).item()
        evaluation = {"val_loss": val_loss, "val_ppl": perplexity(val_loss)}
        self.metrics.write({"step": self.state.step, **evaluation})
        self.log.info(f"step {self.state.step}: val_loss {val_loss:.4f}, val_ppl {evaluation['val_ppl']:.2f}")
        return evaluation
    def save_final(self) -> None:
        """`final/`: the model (the best one when validation ran), tokenizer and generation config, loadable with
        AutoModelForCausalLM and AutoTokenizer; then a sample generation from it, and the task's final evaluation."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        from utils.checkpoint import FULL_STATE

        model, tokenizer, checkpoints, out_dir = self.wrapped, self.tokenizer, self.checkpoints, self.out_dir
        state_dict = get_model_state_dict(model, options=FULL_STATE)
        if self.context.is_main:
            final, temporary = out_dir / "final", out_dir / ".tmp-final"
            shutil.rmtree(temporary, ignore_errors=True)
            best = checkpoints.root / "best"
            plain = unwrap_model(model)
            if best.is_dir():
                state_dict = checkpoints.read_model_state(best, plain)
            if is_peft_model(plain):
                # The adapter on its own (final/adapter/), then the base with the adapter merged in (final/).
                from peft import set_peft_model_state_dict

                if best.is_dir():
                    set_peft_model_state_dict(plain, state_dict)
                plain.save_pretrained(temporary / "adapter")
                plain, state_dict = plain.merge_and_unload(), None
            plain.generation_config = GenerationConfig(
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.8, top_p=0.9,
                max_new_tokens=self.config.logging.sample_tokens)
            plain.save_pretrained(temporary, state_dict=state_dict)
            tokenizer.save_pretrained(temporary)
            publish_folder(temporary, final)
            get_logger().info(f"final model written to {final}/ ({'best' if best.is_dir() else 'last'} weights)")
            self.print_sample(final)
            row = self.task.evaluate_final(final, self.config) if self.task.evaluate_final else {}
            if row:
                self.metrics.write({"step": self.state.step, **row})
        barrier(self.context)

    def print_sample(self, folder: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        prompt = self.config.logging.sample_prompt
        if self.task.chat_sample and tokenizer.chat_template:
            inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)
        else:
            inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        torch.manual_seed(self.config.train.seed)
        with torch.no_grad():
            output = model.generate(**inputs, do_sample=True, max_new_tokens=self.config.logging.sample_tokens)
        text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:] if self.task.chat_sample else output[0],
                                skip_special_tokens=True)
        get_logger().info(f"sample: {text!r}")


def run_training(task: Task, default_config: str, description: str, argv: list[str] | None = None) -> dict:
    """A training script's main: parse the config and `--resume`, train, exit 1 when bad steps stopped the run
    (input errors exit 2, with one line)."""

    def add_arguments(parser) -> None:
        parser.add_argument("--resume", default=None, metavar="auto|PATH",
                            help="continue from the latest checkpoint in train.out_dir (auto) or from a step folder")

    @exit_on_input_error
    def main() -> dict:
        config, arguments = parse_config(TrainingConfig, default_config, description, argv, add_arguments)
        summary = Trainer(config, task, arguments.resume).fit()
        if summary["reason"].endswith(STOPPED_BY_BAD_STEPS):
            raise SystemExit(1)
        return summary

    return main()
