"""Checkpoints: one manager owns every file under `out_dir/checkpoints/`.

Layout: `step_<N>/` (Hugging Face model folder + optimizer.pt + rng_state.pt + trainer_state.json + config.yaml),
`best/` (model folder of the best validation loss), and `latest` (a file naming the newest complete step folder).
A checkpoint is written into a hidden temporary folder, fsynced, then renamed, so a crash leaves either the whole
checkpoint or none of it; the last `keep_last` step folders are kept.
"""

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule

from utils.distributed import DistributedContext, all_gather_objects, barrier, unwrap_model
from utils.errors import InputError, error_summary
from utils.files import publish_folder, write_atomically
from utils.logger import get_logger
from utils.lora import is_peft_model

FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Keys that must match for a checkpoint to continue this run exactly (anything else may change on resume).
RESUME_KEYS = {"model": None, "lora": None,
               "data": ("train_files", "text_field", "seq_len", "tokenizer", "streaming"),
               "train": ("micro_batch_size", "grad_accum_steps", "seed"),
               "rlhf": ("method", "beta", "label_smoothing", "sft_weight", "reference_from", "num_generations",
                        "prompts_per_step", "num_iterations")}

# Keys of the sections above that a resumed run may still change: they do not change what is computed.
CHANGEABLE_ON_RESUME = {"model.attn_implementation"}


def load_model_folder(path: Path, model_class=None, attn_implementation: str | None = None) -> nn.Module:
    """A saved model folder (final/, best/ or a checkpoint step folder), in fp32 and eval mode, with every weight
    from the file: from_pretrained would fill missing weights with random ones and drop unknown ones, which would
    silently report on, export or chat with a different model than the one trained. `model_class` defaults to
    ByteModel (any `from_pretrained` class works, e.g. AutoModelForCausalLM); `attn_implementation` (None: sdpa)
    picks the attention function."""
    if model_class is None:
        from model import ByteModel as model_class
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"model folder not found: {path}")
    try:
        model, info = model_class.from_pretrained(path, dtype=torch.float32, output_loading_info=True,
                                                  attn_implementation=attn_implementation)
    except Exception as error:  # any failure to read it means the same to the user: not a usable model folder
        raise InputError(f"cannot read a model from {path}: {error_summary(error)}") from None
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info[kind]:
            names = ", ".join(sorted(str(key) for key in info[kind])[:3])
            raise InputError(f"cannot read a model from {path}: {kind.replace('_', ' ')} in the weights: {names}")
    return model.eval()


def load_starting_model(folder: str, attn_implementation: str | None = None) -> nn.Module:
    """`model.init_from`: a folder of this project or a plain transformers Llama or Mixtral folder, in fp32. The
    model keeps its class, so that what a run writes is the same kind of folder it started from."""
    from transformers import AutoModelForCausalLM

    from model import ByteModelConfig

    if not Path(folder).is_dir():
        raise InputError(f"model.init_from: folder not found: {folder}")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn_implementation)
    try:
        ByteModelConfig.from_llama_family(model.config)
    except ValueError as error:
        raise InputError(f"model.init_from: {error}") from None
    return model


def save_model_folder(model: nn.Module, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """`save_pretrained` of the model inside any wrapper: weights, config, generation config, and for a ByteModel its
    code with an `auto_map`, so the folder loads with `trust_remote_code=True` where this project is not installed."""
    plain = unwrap_model(model)
    wrapped = type(plain)
    # fully_shard swaps in a subclass defined inside torch, and save_pretrained copies the source file of the
    # instance's class: for the save, the model is its own class again.
    plain.__class__ = next(cls for cls in wrapped.__mro__ if not issubclass(cls, FSDPModule))
    try:
        plain.save_pretrained(folder, state_dict=state_dict)
    finally:
        plain.__class__ = wrapped


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_mismatch(saved: dict, current: dict, defaults: dict) -> str | None:
    """Why a checkpoint saved with config `saved` cannot continue a run with config `current` exactly, or None.
    A key the saved config lacks (written before the key existed) had its default (`defaults`, same layout)."""
    if current["data"].get("streaming") and saved["data"].get("num_workers") != current["data"]["num_workers"]:
        # The stream is dealt to one shard per process and worker; the saved positions are per shard.
        return (f"data.num_workers was {saved['data'].get('num_workers')!r}, this run has "
                f"{current['data']['num_workers']!r} (a stream resumes only with the same shards)")
    for section, keys in RESUME_KEYS.items():
        if section not in current:  # a section only some stages have
            continue
        for key in keys or current[section]:
            if key not in current[section] or f"{section}.{key}" in CHANGEABLE_ON_RESUME:
                continue
            before = saved.get(section, {}).get(key, defaults[section][key])
            if before != current[section][key]:
                return f"{section}.{key} was {before!r}, this run has {current[section][key]!r}"
    return None


def _step(folder: Path) -> int:
    return int(folder.name[len("step_"):])


class CheckpointManager:
    def __init__(self, out_dir: str | Path, keep_last: int, context: DistributedContext, expert_parallel=None):
        if keep_last < 1:
            raise InputError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
        self.root = Path(out_dir) / "checkpoints"
        self.keep_last = keep_last
        self.context = context
        self.expert_parallel = expert_parallel  # an ExpertParallel: the files hold every expert, each process a slice

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Collective. The full model state (on the main process), experts global."""
        state = get_model_state_dict(model, options=FULL_STATE)
        if self.expert_parallel:
            self.expert_parallel.global_state(state)
        return state

    def step_folders(self) -> list[Path]:
        """Complete step folders, newest first."""
        if not self.root.is_dir():
            return []
        folders = [path for path in self.root.glob("step_*") if path.is_dir() and path.name[5:].isdigit()]
        return sorted(folders, key=_step, reverse=True)

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if pointer.is_file():
            folder = self.root / pointer.read_text().strip()
            if folder.is_dir():
                return folder
        folders = self.step_folders()
        return folders[0] if folders else None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict,
             config: dict) -> Path:
        """Collective: every rank calls it. Full (unsharded) states are gathered to CPU and written by rank 0."""
        model_state = get_model_state_dict(model, options=FULL_STATE)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=FULL_STATE)
        if self.expert_parallel:
            self.expert_parallel.global_state(model_state, optimizer_state, optimizer)
        rng_states = all_gather_objects(rng_state(), self.context)
        final = self.root / f"step_{step}"
        if self.context.is_main:
            temporary = self.root / f".tmp-step_{step}"
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
            save_model_folder(model, temporary, model_state)
            torch.save(optimizer_state, temporary / "optimizer.pt")
            torch.save(rng_states, temporary / "rng_state.pt")
            (temporary / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
            (temporary / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
            publish_folder(temporary, final)
            write_atomically(self.root / "latest", final.name + "\n")
            # Keep the newest `keep_last` of this run's line; later-numbered folders of an abandoned branch stay.
            for old in [folder for folder in self.step_folders() if _step(folder) <= step][self.keep_last:]:
                shutil.rmtree(old, ignore_errors=True)
        barrier(self.context)
        return final

    def save_best(self, model: nn.Module, metrics: dict) -> Path:
        """Collective. Replaces `best/` with the current model (and the metrics that made it best)."""
        model_state = self.model_state(model)
        final = self.root / "best"
        if self.context.is_main:
            temporary = self.root / ".tmp-best"
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
            save_model_folder(model, temporary, model_state)
            (temporary / "best_metrics.json").write_text(json.dumps(metrics, indent=2))
            publish_folder(temporary, final)
        barrier(self.context)
        return final

    def save_final(self, model: nn.Module, tokenizer, generation_config, final: Path) -> Path:
        """Collective. `final`: the model (from best/ when validation ran, else as it is now), tokenizer and
        generation config, loadable with AutoModelForCausalLM and AutoTokenizer. A LoRA model is written twice: the
        adapter alone in final/adapter/, and the base with the adapter merged in as final/ itself."""
        state_dict = self.model_state(model)
        if self.context.is_main:
            temporary = final.with_name(f".tmp-{final.name}")
            shutil.rmtree(temporary, ignore_errors=True)
            best = self.root / "best"
            plain = unwrap_model(model)
            if best.is_dir():
                state_dict = self.read_model_state(best, plain)
            if is_peft_model(plain):
                from peft import set_peft_model_state_dict

                if best.is_dir():
                    set_peft_model_state_dict(plain, state_dict)
                plain.save_pretrained(temporary / "adapter")
                plain, state_dict = plain.merge_and_unload(), None
            plain.generation_config = generation_config
            save_model_folder(plain, temporary, state_dict)
            tokenizer.save_pretrained(temporary)
            publish_folder(temporary, final)
            get_logger().info(f"final model written to {final}/ ({'best' if best.is_dir() else 'last'} weights)")
        return final

    @staticmethod
    def read_model_state(folder: Path, model: nn.Module) -> dict[str, torch.Tensor]:
        """The weights a checkpoint folder holds: the adapter of a peft model, else the full model (a tied
        lm_head, which save_pretrained leaves out, is restored from the embedding)."""
        if is_peft_model(model):
            return load_file(folder / "adapter_model.safetensors")
        state = load_file(folder / "model.safetensors")
        if "lm_head.weight" not in state and model.config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        return state

    def candidates(self, resume: str) -> list[Path]:
        if resume == "auto":
            latest = self.latest()
            if latest is None:
                return []
            # Folders with a higher step than `latest` belong to a branch abandoned by resuming from an earlier
            # checkpoint: never fall back into it.
            older = [folder for folder in self.step_folders() if _step(folder) < _step(latest)]
            return [latest] + older
        path = Path(resume)
        if not path.is_dir():
            raise InputError(f"checkpoint not found: {path}")
        return [path]

    def load(self, resume: str, model: nn.Module, optimizer: torch.optim.Optimizer,
             check_compatible) -> tuple[Path, dict, dict] | None:
        """Restore model and optimizer from the first usable candidate and return (folder, trainer state, this
        rank's RNG state); the caller restores the RNG state last, right before training continues, so that
        nothing in between draws from it. `check_compatible(saved_config)` returns a reason string when the
        checkpoint cannot continue this run. A damaged or incompatible checkpoint is reported and the previous
        one tried; with `--resume auto` and no checkpoint at all, None (start fresh)."""
        log = get_logger()
        candidates = self.candidates(resume)
        if not candidates:
            log.info("no checkpoint to resume from: starting a new run")
            return None
        for folder in candidates:
            try:
                saved_config = yaml.safe_load((folder / "config.yaml").read_text())
                reason = check_compatible(saved_config)
                if reason:
                    raise InputError(f"incompatible config: {reason}")
                trainer_state = json.loads((folder / "trainer_state.json").read_text())
                model_state = self.read_model_state(folder, unwrap_model(model))
                optimizer_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
                rng_states = torch.load(folder / "rng_state.pt", weights_only=False)
                if len(rng_states) != self.context.world_size:
                    raise InputError(f"saved by {len(rng_states)} processes, this run has {self.context.world_size}")
                if self.expert_parallel:
                    self.expert_parallel.local_state(model_state, optimizer_state)
                if is_peft_model(unwrap_model(model)):
                    from peft import set_peft_model_state_dict

                    result = set_peft_model_state_dict(unwrap_model(model), model_state)
                    if result.unexpected_keys:
                        raise InputError(f"unexpected adapter weights {result.unexpected_keys[:3]}")
                else:
                    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
                set_optimizer_state_dict(model, optimizer, optimizer_state,
                                         options=StateDictOptions(full_state_dict=True))
            except Exception as error:  # a damaged file can fail in many ways; each means "not usable"
                log.warning(f"checkpoint {folder} refused: {error_summary(error)}")
                continue
            log.info(f"resumed from {folder} (step {trainer_state['step']})")
            return folder, trainer_state, rng_states[self.context.rank]
        raise InputError(f"no usable checkpoint among {', '.join(str(c) for c in candidates)} (see warnings above)")
