"""The one training engine, shared by pretraining and SFT.

`Trainer(config, task).fit(resume)` reads like the recipe it runs: distributed set-up, tokenizer, data, model,
optimizer and schedule, an optional resume, then the loop (accumulate, clip, step, log, evaluate, checkpoint) and
the final model. Scripts only choose the task's datasets; everything else is here once.
"""

import contextlib
import json
import math
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, IterableDataset
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from model import ByteModel, ByteModelConfig, enable_activation_checkpointing, moe_layers, update_expert_bias
from utils.checkpoint import CheckpointManager, is_peft_model, publish_folder, set_rng_state
from utils.config import TrainingConfig, config_to_dict, model_config_from, save_config
from utils.errors import InputError, error_summary
from utils.data import ResumableSampler
from utils.distributed import (all_gather_objects, all_reduce_sum, any_rank, barrier, init_distributed, main_first,
                               teardown, unwrap_model, wrap_model)
from utils.logger import get_logger, quiet_transformers, setup_logger
from utils.metrics import perplexity
from utils.model_info import flops_per_token as flops_per_token_by_component
from utils.progressbar import ProgressBar

SWANLAB_MODES = {"offline": "offline", "local": "local", "cloud": "online", "disabled": "disabled"}
# Keys that must match for a checkpoint to continue this run exactly (anything else may change on resume).
RESUME_KEYS = {"model": None, "lora": None, "data": ("train_files", "seq_len", "tokenizer", "streaming"),
               "train": ("micro_batch_size", "grad_accum_steps", "seed")}


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """`auto` picks bf16 only where the hardware runs it natively (CUDA with bf16, or a CPU with AVX-512 BF16):
    elsewhere bf16 is emulated and far slower than fp32. fp16 on a CPU is never worth it."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else torch.float32
    if name == "fp16" and device.type == "cpu":
        raise InputError("train.precision=fp16 is very slow on a CPU; use bf16 (native on AVX-512 BF16) or fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms, biases and embeddings are left alone (nanoGPT, Llama)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim >= 2 and "embed_tokens" not in name else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainingConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.optim.weight_decay)
    options = dict(lr=config.optim.lr, betas=(config.optim.beta1, config.optim.beta2))
    try:
        # One fused kernel per step instead of a dozen elementwise ops per parameter group.
        return torch.optim.AdamW(groups, fused=True, **options)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **options)


def resolve_compile(setting: bool | str, device: torch.device, dtype: torch.dtype, model: nn.Module) -> bool:
    """`train.compile: auto` compiles where scripts/benchmark.py measured it paying for its ~30 s compile: with
    bf16 autocast (1.3x over eager on an AVX-512 BF16 CPU) or on CUDA; not in fp32 on a CPU (about 1.1x, which a
    demo-length run loses to the compile), and not for MoE models (data-dependent expert dispatch) or LoRA."""
    if isinstance(setting, bool):
        return setting
    return (device.type == "cuda" or dtype == torch.bfloat16) and not moe_layers(model) and not is_peft_model(model)


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 8) -> float:
    """Matrix-multiply FLOP/s this device reaches right now: the honest denominator of MFU on a machine whose
    datasheet peak is unknown (a laptop CPU) or shared."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that contribute to the loss, matching the model's shift of `labels`."""
    if "shift_labels" in batch:
        return int((batch["shift_labels"] != -100).sum())
    return int((batch["labels"][:, 1:] != -100).sum())


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch on `device`. Packed windows carry `shift_labels` only; transformers' models (Llama, Mixtral) compute
    a loss only when `labels` is given and then prefer `shift_labels`, as their Trainer passes both, so `labels`
    names the same tensor (ByteModel reads `shift_labels` alone)."""
    batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    if "shift_labels" in batch:
        batch.setdefault("labels", batch["shift_labels"])
    return batch


class GracefulStop:
    """SIGINT/SIGTERM ask the loop to stop after the current step (then a checkpoint is saved); a second SIGINT
    interrupts at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self) -> "GracefulStop":
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            self.previous[signal_number] = signal.signal(signal_number, self.handle)
        return self

    def handle(self, signal_number, frame) -> None:
        if self.requested and signal_number == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        get_logger().warning(f"received {signal.Signals(signal_number).name}: saving a checkpoint after this step")

    def __exit__(self, *exc) -> None:
        for signal_number, handler in self.previous.items():
            signal.signal(signal_number, handler)


class MetricsWriter:
    """metrics.jsonl on rank 0 (truncated to the resumed step, so a resumed run's file reads like an uninterrupted
    one) and swanlab with the configured mode."""

    def __init__(self, out_dir: Path, enabled: bool, swanlab_mode: str, project: str, config: dict,
                 resume_step: int | None):
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.run = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            rows = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(row + "\n" for row in rows))
        elif resume_step is None:
            self.path.write_text("")
        if swanlab_mode != "disabled":
            import swanlab  # imported lazily: it is slow to import and optional at run time

            self.run = swanlab.init(project=project, name=out_dir.name, config=config,
                                    mode=SWANLAB_MODES[swanlab_mode], log_dir=str(out_dir / "swanlog"))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.run is not None:
            step = row["step"]
            # Scalars only: lists (the per-expert load) stay in metrics.jsonl.
            self.run.log({key: value for key, value in row.items()
                          if key != "step" and isinstance(value, (int, float))}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class RouterMonitor:
    """Expert load, dropped token-slots and the balancing losses of an MoE model, summed over micro-batches and
    processes; applies the auxiliary-loss-free bias update after every optimizer step. Does nothing for a dense
    model. Per MoE layer, one row of counts: token-slots routed to each expert, then the slots dropped, so that a
    step needs a single all-reduce."""

    def __init__(self, model: nn.Module, bias_update_rate: float, context):
        self.layers = moe_layers(model)
        self.rate, self.context = bias_update_rate, context
        self.enabled = bool(self.layers)
        if self.enabled:
            self.step_counts = torch.zeros(len(self.layers), self.layers[0].num_experts + 1, device=context.device)
            self.window_counts = torch.zeros_like(self.step_counts)
            self.window_losses = torch.zeros(3, device=context.device)  # aux, z, micro-batches

    def after_forward(self, outputs) -> None:
        if not self.enabled:
            return
        self.step_counts += torch.stack([torch.cat([layer.router_stats.expert_counts, layer.router_stats.dropped[None]])
                                         for layer in self.layers])
        self.window_losses += torch.stack([outputs.aux_loss.detach().float(), outputs.z_loss.detach().float(),
                                           torch.ones((), device=self.context.device)])

    def after_step(self, model: nn.Module, applied: bool) -> None:
        if not self.enabled:
            return
        counts = all_reduce_sum(self.step_counts, self.context)
        if self.rate > 0 and applied:
            update_expert_bias(model, counts[:, :-1], self.rate)
        self.window_counts += counts
        self.step_counts.zero_()

    def metrics(self) -> dict:
        """Means over the logging window: `expert_load` is each MoE layer's share of token-slots per expert,
        `max_load` the busiest expert's share times the number of experts (1.0 = balanced)."""
        if not self.enabled:
            return {}
        aux, z, micro_batches = all_reduce_sum(self.window_losses, self.context).tolist()
        routed, dropped = self.window_counts[:, :-1], self.window_counts[:, -1]
        slots = routed.sum(dim=1).clamp(min=1)
        load = routed / slots[:, None]
        row = {"aux_loss": aux / max(micro_batches, 1), "z_loss": z / max(micro_batches, 1),
               "dropped_frac": (dropped.sum() / slots.sum()).item(),
               "max_load": (load.max() * load.shape[1]).item(),
               "expert_load": [[round(value, 4) for value in layer] for layer in load.tolist()]}
        self.window_counts.zero_()
        self.window_losses.zero_()
        return row


class Trainer:
    """`make_datasets(tokenizer, config, context, log)` returns (train dataset, validation dataset or None,
    collate function or None); batches are dicts of model inputs with `labels` or `shift_labels`."""

    def __init__(self, config: TrainingConfig, make_datasets: Callable[..., tuple[Dataset, Dataset | None, Any]],
                 chat_sample: bool = False):
        self.config = config
        self.make_datasets = make_datasets
        self.chat_sample = chat_sample  # render the closing sample prompt as a user turn of the chat template
        self.check_config()

    def check_config(self) -> None:
        config = self.config
        for key in ("train.micro_batch_size", "train.grad_accum_steps", "checkpoint.every_steps",
                    "eval.every_steps", "logging.every_steps", "train.max_bad_steps", "train.epochs"):
            section, name = key.split(".")
            if getattr(getattr(config, section), name) < 1:
                raise InputError(f"{key} must be >= 1, got {getattr(getattr(config, section), name)}")
        if config.train.max_steps is not None and config.train.max_steps < 1:
            raise InputError(f"train.max_steps must be >= 1 or null, got {config.train.max_steps}")
        if not 0 <= config.optim.min_lr <= config.optim.lr:
            raise InputError(f"optim.min_lr must be in [0, optim.lr], got {config.optim.min_lr}")
        if config.lora.enabled:
            if config.lora.rank < 1 or config.lora.alpha <= 0 or not 0 <= config.lora.dropout < 1:
                raise InputError("lora needs rank >= 1, alpha > 0 and 0 <= dropout < 1")
            if not config.lora.target_modules:
                raise InputError("lora.target_modules is empty")
            if config.train.strategy == "fsdp":
                raise InputError("LoRA runs with train.strategy=ddp (the adapters are small: sharding them gains "
                                 "nothing)")

    # ------------------------------------------------------------------ set-up

    def build_model(self, tokenizer) -> nn.Module:
        section = self.config.model
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
        if self.config.lora.enabled:
            from peft import LoraConfig, get_peft_model

            lora = self.config.lora
            try:
                model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha,
                                                         lora_dropout=lora.dropout,
                                                         target_modules=lora.target_modules, task_type="CAUSAL_LM"))
            except ValueError as error:
                raise InputError(f"lora: {error_summary(error)}") from None
        return model

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
        if not (Path(init_from) / "tokenizer_config.json").is_file():
            raise InputError(f"model.init_from {init_from} holds no tokenizer: set data.tokenizer to the one its "
                             f"model was trained with")
        return init_from

    def check_resumable(self, saved: dict) -> str | None:
        current = config_to_dict(self.config)
        if current["data"]["streaming"] and saved["data"].get("num_workers") != current["data"]["num_workers"]:
            # The stream is dealt to one shard per process and worker; the saved positions are per shard.
            return (f"data.num_workers was {saved['data'].get('num_workers')!r}, this run has "
                    f"{current['data']['num_workers']!r} (a stream resumes only with the same shards)")
        for section, keys in RESUME_KEYS.items():
            for key in keys or current[section]:
                if saved.get(section, {}).get(key) != current[section][key]:
                    return (f"{section}.{key} was {saved.get(section, {}).get(key)!r}, "
                            f"this run has {current[section][key]!r}")
        return None

    def loader(self, dataset: Dataset, sampler, collate) -> DataLoader:
        # An own generator: creating a loader must not draw from the global RNG, or a resumed run (which creates
        # its loader at another moment) would see different dropout masks than an uninterrupted one.
        generator = torch.Generator().manual_seed(self.config.train.seed)
        return DataLoader(dataset, batch_size=self.config.train.micro_batch_size, sampler=sampler,
                          collate_fn=collate, num_workers=self.config.data.num_workers, drop_last=True,
                          pin_memory=self.context.device.type == "cuda", generator=generator)

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless stream of micro-batches over epochs; `self.epoch`/`self.consumed` (or, streaming, the position
        of every shard) always name the position right after the last batch handed out, which is what a
        checkpoint records."""
        while self.sampler is None:
            self.train_dataset.positions = dict(self.stream_positions)
            loader = DataLoader(self.train_dataset, batch_size=self.config.train.micro_batch_size,
                                collate_fn=self.collate, num_workers=self.config.data.num_workers,
                                generator=torch.Generator().manual_seed(self.config.train.seed))
            for batch in loader:
                # A batch comes from one shard (one DataLoader worker); its last row says where that shard resumes.
                shard = int(batch.pop("shard")[-1])
                self.stream_positions[shard] = (int(batch.pop("document")[-1]), int(batch.pop("offset")[-1]))
                yield model_inputs(batch, self.context.device)
            self.epoch, self.stream_positions = self.epoch + 1, {}
        while True:
            self.sampler.set_epoch(self.epoch, self.consumed)
            for batch in self.loader(self.train_dataset, self.sampler, self.collate):
                self.consumed += self.config.train.micro_batch_size
                yield model_inputs(batch, self.context.device)
            self.epoch, self.consumed = self.epoch + 1, 0

    def num_shards(self) -> int:
        """A stream is dealt to one shard per process and DataLoader worker."""
        return self.context.world_size * max(1, self.config.data.num_workers)

    # ------------------------------------------------------------------ the run

    def fit(self, resume: str | None = None) -> dict:
        """Train; return a summary (final step, losses, why it stopped). Raises InputError for bad input."""
        config = self.config
        self.context = context = init_distributed(config.train.device)
        out_dir = Path(config.train.out_dir)
        failed = False
        log = setup_logger(out_dir / "train.log", context.rank)
        quiet_transformers(errors_only=False)
        try:
            torch.manual_seed(config.train.seed)
            dtype = resolve_precision(config.train.precision, context.device)
            checkpoints = CheckpointManager(out_dir, config.checkpoint.keep_last, context)
            if resume is None and checkpoints.step_folders():
                raise InputError(f"{checkpoints.root} already holds checkpoints: pass --resume auto to continue, "
                                 f"or choose another train.out_dir")
            config.data.tokenizer = self.resolve_tokenizer()
            tokenizer = AutoTokenizer.from_pretrained(config.data.tokenizer)

            # Rank 0 tokenizes and caches the data first; the others then read the finished cache.
            self.train_dataset, val_dataset, self.collate = main_first(
                lambda: self.make_datasets(tokenizer, config, log.info), context, (InputError,))

            model = self.build_model(tokenizer).to(context.device)
            num_parameters = sum(parameter.numel() for parameter in model.parameters())
            trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
            if config.train.gradient_checkpointing:
                enable_activation_checkpointing(model)
            if isinstance(self.train_dataset, IterableDataset):
                # Streaming: the data's length is unknown, so the run is measured in steps.
                if config.train.max_steps is None:
                    raise InputError("data.streaming needs train.max_steps (a stream has no known epoch length)")
                self.sampler, steps_per_epoch, total_steps = None, "unknown", config.train.max_steps
                data_description = "streamed training data"
            else:
                self.sampler = ResumableSampler(len(self.train_dataset), context.rank, context.world_size,
                                                config.train.seed, lengths=getattr(self.train_dataset, "lengths", None),
                                                group_size=64 * config.train.micro_batch_size * context.world_size)
                steps_per_epoch = len(self.sampler) // (config.train.micro_batch_size * config.train.grad_accum_steps)
                if steps_per_epoch < 1:
                    raise InputError(f"the training data ({len(self.train_dataset)} samples) does not fill one step "
                                     f"of {config.train.micro_batch_size * config.train.grad_accum_steps} per rank")
                total_steps = config.train.max_steps or config.train.epochs * steps_per_epoch
                data_description = f"{len(self.train_dataset)} training samples"
            wrapped = wrap_model(model, config.train.strategy, context,
                                 param_dtype=dtype if dtype != torch.float32 else None)
            optimizer = build_optimizer(wrapped, config, context.device)
            scheduler = get_cosine_with_min_lr_schedule_with_warmup(
                optimizer, min(config.optim.warmup_steps, total_steps), total_steps, min_lr=config.optim.min_lr)
            compiled = resolve_compile(config.train.compile, context.device, dtype, model)
            forward_model = torch.compile(wrapped) if compiled else wrapped

            flops_per_token = sum(flops_per_token_by_component(ByteModelConfig.from_llama_family(model.config),
                                                               config.data.seq_len).values())
            peak_flops = measure_peak_flops(context.device, dtype) * context.world_size
            self.epoch = self.consumed = 0
            self.stream_positions: dict[int, tuple[int, int]] = {}
            state = {"step": 0, "tokens_seen": 0, "best_val_loss": None, "evals_without_improvement": 0,
                     "bad_steps": 0}
            saved_rng = None
            if resume is not None:
                loaded = checkpoints.load(resume, wrapped, optimizer, self.check_resumable)
                if loaded is not None:
                    _, state, saved_rng = loaded
                    scheduler.load_state_dict(state.pop("scheduler"))
                    position = state.pop("sampler")
                    if self.sampler is None:
                        self.epoch = position["epoch"]
                        self.stream_positions = {int(shard): tuple(value)
                                                 for shard, value in position["positions"].items()}
                    else:
                        self.sampler.load_state_dict(position)
                        self.epoch, self.consumed = self.sampler.epoch, self.sampler.start
            if context.is_main:
                save_config(config, out_dir / "config.yaml")
            metrics = MetricsWriter(out_dir, context.is_main, config.logging.swanlab_mode, config.logging.project,
                                    config_to_dict(config), state["step"] if resume is not None else None)
            log.info(f"tokenizer: {config.data.tokenizer}; "
                     f"model: {num_parameters / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable); "
                     f"{data_description}, "
                     f"{steps_per_epoch} steps per epoch, {total_steps} steps; precision {dtype}; "
                     f"{context.world_size} process(es), {config.train.strategy}; device {context.device}"
                     f"{'; compiled' if compiled else ''}")
            if saved_rng is not None:
                set_rng_state(saved_rng)  # last, so that nothing between restore and training draws from it
            with GracefulStop() as stop:
                summary = self.loop(forward_model, wrapped, optimizer, scheduler, checkpoints, metrics, stop, state,
                                    total_steps, dtype, val_dataset, flops_per_token, peak_flops)
            metrics.close()
            if summary["reason"] in ("finished", "early stopping"):
                self.save_final(wrapped, tokenizer, checkpoints, out_dir)
            del forward_model, wrapped, model, optimizer
            return summary
        except torch.OutOfMemoryError:
            failed = True
            raise InputError("out of memory: lower train.micro_batch_size (raise train.grad_accum_steps to keep the "
                             "batch), lower data.seq_len, set train.gradient_checkpointing=true, or use "
                             "train.precision=bf16 or train.strategy=fsdp") from None
        except BaseException:
            failed = True
            raise
        finally:
            # After a failure the other ranks may never reach a barrier: leave without waiting for them.
            teardown(context, wait=not failed)

    def loop(self, forward_model, model, optimizer, scheduler, checkpoints, metrics, stop, state, total_steps,
             dtype, val_dataset, flops_per_token, peak_flops) -> dict:
        config, context, log = self.config, self.context, get_logger()
        autocast = (torch.autocast(context.device.type, dtype=dtype) if dtype != torch.float32
                    else contextlib.nullcontext())
        scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
        batches = self.batches()
        accumulation = config.train.grad_accum_steps
        bad_in_row, reason = 0, "finished"
        start_time, window_tokens, window_start = time.perf_counter(), 0, time.perf_counter()
        losses: list[float] = []
        last_eval = None
        router = RouterMonitor(model, getattr(unwrap_model(model).config, "router_bias_update_rate", 0.0), context)

        def trainer_state() -> dict:
            if self.sampler is None:
                # Every rank reads its own shards: collect all their positions (rank 0 writes the file).
                positions = all_gather_objects(self.stream_positions, context)
                merged = {str(shard): list(value) for part in positions for shard, value in part.items()}
                position = {"epoch": self.epoch, "num_shards": self.num_shards(), "positions": merged}
            else:
                position = {**self.sampler.state_dict(0), "epoch": self.epoch, "consumed": self.consumed}
            return {**state, "scheduler": scheduler.state_dict(), "sampler": position}

        def save() -> None:
            checkpoints.save(state["step"], model, optimizer, trainer_state(), config_to_dict(config))

        with ProgressBar(total_steps, enabled=context.is_main, start=state["step"]) as progress:
            while state["step"] < total_steps:
                if any_rank(stop.requested, context):
                    reason = "stopped by signal"
                    save()
                    break
                micro_batches = [next(batches) for _ in range(accumulation)]
                # Normalise by the targets of the whole step on all ranks, so every token weighs the same however
                # they fall into micro-batches and ranks (DDP/FSDP average gradients over ranks, hence * world).
                targets = all_reduce_sum(torch.tensor([float(sum(map(count_targets, micro_batches)))]), context)
                num_items = targets.item() / context.world_size
                step_loss = torch.zeros((), device=context.device)
                model.train()
                for index, batch in enumerate(micro_batches):
                    with self.gradient_sync(model, index == accumulation - 1), autocast:
                        outputs = forward_model(**batch, num_items_in_batch=num_items)
                    router.after_forward(outputs)
                    loss = outputs.loss
                    scaler.scale(loss).backward()
                    step_loss += loss.detach()
                step_loss = all_reduce_sum(step_loss.float(), context) / context.world_size
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
                grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                finite = math.isfinite(step_loss.item()) and math.isfinite(grad_norm)
                if finite:
                    scaler.step(optimizer)
                    bad_in_row = 0
                else:
                    state["bad_steps"] += 1
                    bad_in_row += 1
                    log.warning(f"step {state['step'] + 1}: non-finite loss or gradient, step skipped "
                                f"({bad_in_row} in a row, {state['bad_steps']} in total)")
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                router.after_step(model, applied=finite)
                scheduler.step()
                state["step"] += 1
                step_tokens = int(sum(batch["input_ids"].numel() for batch in micro_batches)) * context.world_size
                state["tokens_seen"] += step_tokens
                window_tokens += step_tokens
                if finite:
                    losses.append(step_loss.item())

                if bad_in_row >= config.train.max_bad_steps:
                    # The skipped steps never changed the weights, so this saves the last good state.
                    save()
                    reason = f"{bad_in_row} non-finite steps in a row"
                    log.error(f"stopping: {reason}; the last good state is saved in {checkpoints.latest()}. "
                              f"Lower optim.lr, check the data, or use train.precision=fp32")
                    break
                if state["step"] % config.logging.every_steps == 0 or state["step"] == total_steps:
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_tokens / max(elapsed, 1e-9)
                    row = {"step": state["step"], "loss": step_loss.item() if finite else None,
                           "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm if finite else None,
                           "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_per_token / peak_flops,
                           "elapsed_s": time.perf_counter() - start_time, **router.metrics()}
                    metrics.write(row)
                    progress.update(state["step"], loss=row["loss"] or float("nan"), lr=row["lr"],
                                    tok_s=round(tokens_per_s))
                    window_tokens, window_start = 0, time.perf_counter()
                if val_dataset is not None and (state["step"] % config.eval.every_steps == 0
                                                or state["step"] == total_steps):
                    last_eval = self.evaluate(forward_model, val_dataset, autocast)
                    metrics.write({"step": state["step"], **last_eval})
                    log.info(f"step {state['step']}: val_loss {last_eval['val_loss']:.4f}, "
                             f"val_ppl {last_eval['val_ppl']:.2f}")
                    if self.improved(last_eval["val_loss"], state):
                        checkpoints.save_best(model, {"step": state["step"], **last_eval})
                    elif config.eval.patience and state["evals_without_improvement"] >= config.eval.patience:
                        reason = "early stopping"
                        log.info(f"early stopping: no improvement of val_loss by more than {config.eval.min_delta} "
                                 f"in {config.eval.patience} evaluations (best {state['best_val_loss']:.4f})")
                        save()
                        break
                if state["step"] % config.checkpoint.every_steps == 0 or state["step"] == total_steps:
                    save()
        return {"step": state["step"], "reason": reason, "losses": losses, "last_eval": last_eval,
                "best_val_loss": state["best_val_loss"], "bad_steps": state["bad_steps"],
                "tokens_seen": state["tokens_seen"]}

    def improved(self, val_loss: float, state: dict) -> bool:
        best = state["best_val_loss"]
        if best is None or val_loss < best - self.config.eval.min_delta:
            state["best_val_loss"], state["evals_without_improvement"] = val_loss, 0
            return True
        state["evals_without_improvement"] += 1
        return False

    @staticmethod
    def gradient_sync(model: nn.Module, sync: bool):
        """Only the last micro-batch of a step all-reduces gradients; the others accumulate locally."""
        if isinstance(model, DistributedDataParallel) and not sync:
            return model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset, autocast) -> dict[str, float]:
        """Token-weighted mean loss over the first `eval.max_batches` batches of the validation split; the ranks
        share those batches, so the result does not depend on the number of processes."""
        model.eval()
        sampler = ResumableSampler(len(dataset), self.context.rank, self.context.world_size, shuffle=False)
        batches_per_rank = math.ceil(self.config.eval.max_batches / self.context.world_size)
        totals = torch.zeros(2, device=self.context.device)
        for index, batch in enumerate(self.loader(dataset, sampler, self.collate)):
            if index >= batches_per_rank:
                break
            batch = model_inputs(batch, self.context.device)
            targets = count_targets(batch)
            with autocast:
                loss = model(**batch).loss
            totals += torch.stack([loss.float() * targets, torch.tensor(float(targets), device=loss.device)])
        all_reduce_sum(totals, self.context)
        val_loss = (totals[0] / totals[1].clamp(min=1)).item()
        return {"val_loss": val_loss, "val_ppl": perplexity(val_loss)}

    def save_final(self, model: nn.Module, tokenizer, checkpoints: CheckpointManager, out_dir: Path) -> None:
        """`final/`: the model (the best one when validation ran), tokenizer and generation config, loadable with
        AutoModelForCausalLM and AutoTokenizer; then a sample generation from it."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        from utils.checkpoint import FULL_STATE

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
        barrier(self.context)

    def print_sample(self, folder: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        prompt = self.config.logging.sample_prompt
        if self.chat_sample and tokenizer.chat_template:
            inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)
        else:
            inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        torch.manual_seed(self.config.train.seed)
        with torch.no_grad():
            output = model.generate(**inputs, do_sample=True, max_new_tokens=self.config.logging.sample_tokens)
        text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:] if self.chat_sample else output[0],
                                skip_special_tokens=True)
        get_logger().info(f"sample: {text!r}")
