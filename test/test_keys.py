"""Every option a script's `--help` lists does what it says, and a test would notice if it stopped.

KEYS holds one row per script and option: the test that fails when the option is ignored (its node id), or a
`Changed` row that this file runs itself, with the option at its default and at another value, asserting the
observable the option exists to change. A script or option without a row fails `test_every_listed_option_has_a_row`;
a row naming a test that does not exist fails `test_every_named_test_exists`."""

import contextlib
import io
import json
import re
import runpy
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

import model_pretrain
import model_rlhf_train
import model_sft_train
from conftest import COLLECTED
from helpers import DEMO, expected_stream, project_logger_restored, save_tiny_start, write_lines
from model import ByteModel, ByteModelConfig
from training import make_config, read_metrics
from utils.config import (PreferenceConfig, SFTConfig, TrainingConfig, build_config, config_to_dict,
                          model_config_from)
from utils.errors import InputError
from utils.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- rows run by this file

@dataclass(frozen=True)
class Changed:
    """A row run by `test_a_changed_value_changes_its_observable`: a short run of a training stage (`fit`), or just
    its built Trainer, with the key at `value` and at its default; `check(default, changed)` asserts the observable.
    `also` holds overrides both runs share (a switch the key needs, say). Strings may name the `files` fixture's
    paths as `{name}`."""
    value: Any
    check: Callable[["Run", "Run"], None]
    fit: bool = True
    also: dict = field(default_factory=dict)
    stage: str = "pretrain"


@dataclass
class Run:
    trainer: Trainer | None
    error: InputError | None  # raised while building the Trainer, instead of one
    out_dir: Path
    files: dict[str, Path]
    rows: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)
    stepped_norms: list[float] = field(default_factory=list)  # the gradient norm each optimizer step applied


SFT_DATA, PAIRS, PROMPTS = (str(DEMO / name) for name in ("sft_val.jsonl", "rlhf_val.jsonl", "arithmetic_val.jsonl"))
# Each stage's task and schema, and what its short runs change of the configuration of training.make_config: three
# steps, an evaluation and a checkpoint at the end; the later stages start from a tiny model ({start}).
STAGES = {
    "pretrain": (model_pretrain.PRETRAINING, TrainingConfig, {}),
    "sft": (model_sft_train.SFT, SFTConfig, {"data": {"train_files": [SFT_DATA], "val_files": [SFT_DATA],
                                                      "seq_len": 128}}),
    "dpo": (model_rlhf_train.PREFERENCE, PreferenceConfig, {"data": {"train_files": [PAIRS], "val_files": [PAIRS],
                                                                     "seq_len": 128}}),
    "grpo": (model_rlhf_train.PREFERENCE, PreferenceConfig, {
        "data": {"train_files": [PROMPTS], "val_files": [PROMPTS], "seq_len": 48}, "train": {"micro_batch_size": 4},
        "eval": {"sample_prompts": []},
        "rlhf": {"method": "grpo", "beta": 0.0, "reward_functions": ["utils.rewards:format_reward"],
                 "num_generations": 2, "prompts_per_step": 2, "max_completion_tokens": 4}}),
}
BASE = {"train": {"max_steps": 3}, "eval": {"every_steps": 3, "max_batches": 1}, "checkpoint": {"every_steps": 3}}


def with_files(value: Any, files: dict[str, Path]) -> Any:
    if isinstance(value, str):
        return value.format(**files)
    if isinstance(value, list):
        return [with_files(item, files) for item in value]
    if isinstance(value, dict):
        return {key: with_files(item, files) for key, item in value.items()}
    return value


def stage_values(stage: str, out_dir: Path, files: dict[str, Path], sections: dict) -> dict:
    values = config_to_dict(make_config(out_dir, files["cache"]))
    if stage != "pretrain":
        values["model"] = {"init_from": str(files["start"])}
        values["data"] = {key: value for key, value in values["data"].items()
                          if key in ("train_files", "val_files", "seq_len", "strict", "num_workers")}
    for overrides in (BASE, STAGES[stage][2], with_files(sections, files)):
        for name, section in overrides.items():
            values[name] = {**values.get(name, {}), **section}
    return values


def gradient_norm(parameters) -> float:
    norms = [torch.linalg.vector_norm(parameter.grad.detach().double()) for parameter in parameters
             if parameter.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item()


def stage_run(stage: str, out_dir: Path, files: dict[str, Path], sections: dict, fit: bool) -> Run:
    task, schema, _ = STAGES[stage]
    try:
        trainer = Trainer(build_config(schema, stage_values(stage, out_dir, files, sections)), task)
    except InputError as error:
        return Run(None, error, out_dir, files)
    run = Run(trainer, None, out_dir, files)
    trainer.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: run.stepped_norms.append(gradient_norm(trainer.model.parameters())))
    if fit:
        trainer.fit()
        run.rows, run.evaluations = read_metrics(out_dir)
    else:
        trainer.metrics.close()
    return run


def check_grad_clip(default: Run, changed: Run) -> None:
    clip, default_clip = changed.trainer.config.optim.grad_clip, default.trainer.config.optim.grad_clip
    first = default.rows[0]["grad_norm"]
    assert first > 10 * clip
    # The same weights and batch: the logged norm is the one before clipping...
    assert changed.rows[0]["grad_norm"] == pytest.approx(first, rel=1e-6)
    # ...and the optimizer steps with the gradient scaled to exactly the clip, or left as it is below it (torch sums
    # the squares in fp32: its norms agree with ours, in fp64, to about 3e-5).
    assert changed.stepped_norms[0] == pytest.approx(clip, rel=1e-4)
    for run, limit in ((changed, clip), (default, default_clip)):
        assert run.stepped_norms == pytest.approx([min(row["grad_norm"], limit) for row in run.rows], rel=1e-4)


def check_weight_decay(default: Run, changed: Run) -> None:
    # Matrices first, then what is never decayed (test_optim checks the groups and the step itself).
    for run in (default, changed):
        decays = [group["weight_decay"] for group in run.trainer.optimizer.param_groups]
        assert decays == [run.trainer.config.optim.weight_decay, 0.0]


def first_step(run: Run, module: Callable[[torch.nn.Module], torch.nn.Module], record: Callable) -> list:
    """What `record(inputs, output)` returns for every call of one of the model's modules during the first
    training step."""
    calls = []
    handle = module(run.trainer.model).register_forward_hook(lambda _, inputs, output: calls.append(
        record(inputs, output)))
    try:
        run.trainer.train_step([next(iter(run.trainer.batches))])
    finally:
        handle.remove()
    return calls


def check_gradient_checkpointing(default: Run, changed: Run) -> None:
    # A checkpointed layer runs its modules again during the backward pass.
    attention = lambda model: model.model.layers[0].self_attn  # noqa: E731
    assert len(first_step(default, attention, lambda *_: None)) == 1
    assert len(first_step(changed, attention, lambda *_: None)) == 2


def check_precision(default: Run, changed: Run) -> None:
    down_proj = lambda model: model.model.layers[0].mlp.down_proj  # noqa: E731
    assert first_step(default, down_proj, lambda _, output: output.dtype) == [torch.float32]
    assert first_step(changed, down_proj, lambda _, output: output.dtype) == [torch.bfloat16]
    # The master weights stay fp32.
    assert all(parameter.dtype == torch.float32 for parameter in changed.trainer.model.parameters())


def check_seed(default: Run, changed: Run) -> None:
    # Another initialisation and another order of the training samples.
    embeddings = [run.trainer.model.model.embed_tokens.weight for run in (default, changed)]
    assert not torch.equal(*embeddings)
    first = [next(iter(run.trainer.batches))["input_ids"] for run in (default, changed)]
    assert not torch.equal(*first)


def check_compile(default: Run, changed: Run) -> None:
    assert default.trainer.forward_model is default.trainer.wrapped
    assert isinstance(changed.trainer.forward_model, torch._dynamo.eval_frame.OptimizedModule)
    assert changed.trainer.forward_model._orig_mod is changed.trainer.wrapped


def check_device(default: Run, changed: Run) -> None:
    assert default.trainer.context.device == torch.device("cpu")
    if torch.cuda.is_available():
        assert changed.trainer.context.device.type == "cuda"
    else:
        assert "train.device" in str(changed.error) and "CUDA" in str(changed.error)


def validation_windows_loss(run: Run, windows: int) -> float:
    """The mean loss of the model (after its run) over the first validation windows, which all hold seq_len
    targets."""
    model = run.trainer.model.eval()
    with torch.no_grad():
        losses = [model(**{key: value[None] for key, value in run.trainer.val_dataset[index].items()},
                        labels=run.trainer.val_dataset[index]["shift_labels"][None]).loss
                  for index in range(windows)]
    return torch.stack(losses).mean().item()


def check_max_batches(default: Run, changed: Run) -> None:
    for run in (default, changed):
        windows = run.trainer.config.eval.max_batches * run.trainer.config.train.micro_batch_size
        assert run.evaluations[-1]["val_loss"] == pytest.approx(validation_windows_loss(run, windows), rel=1e-5)
    assert changed.evaluations[-1]["val_loss"] != default.evaluations[-1]["val_loss"]


def samples(run: Run) -> list[dict]:
    return [json.loads(line) for line in (run.out_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()]


def written_as(run: Run) -> list[str]:
    """The samples the run wrote at its evaluation, written again from its final weights with its settings."""
    from utils.samples import greedy_samples

    config = run.trainer.config
    return greedy_samples(run.trainer.model, run.trainer.tokenizer, config.eval.sample_prompts,
                          config.logging.sample_tokens, repetition_penalty=config.logging.sample_repetition_penalty)


def check_samples(default: Run, changed: Run) -> None:
    for run in (default, changed):
        rows = [row for row in samples(run) if not row.get("final")]
        assert [row["prompt"] for row in rows] == run.trainer.config.eval.sample_prompts
        assert [row["sample"] for row in rows] == written_as(run)
    assert [row["sample"] for row in samples(default)] != [row["sample"] for row in samples(changed)]


def swanlab_files(run: Run) -> list[Path]:
    return sorted((run.out_dir / "swanlog").glob("run-*/run-*.swanlab"))


def check_swanlab_mode(default: Run, changed: Run) -> None:
    assert not (default.out_dir / "swanlog").exists()
    (record,) = swanlab_files(changed)
    assert b"grad_norm" in record.read_bytes()


def check_project(default: Run, changed: Run) -> None:
    assert b"stellarbyte" in swanlab_files(default)[0].read_bytes()
    assert b"keys-audit" in swanlab_files(changed)[0].read_bytes()


def first_window(dataset) -> list[int]:
    return dataset[0]["input_ids"].tolist()


def documents_of(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def check_train_files(default: Run, changed: Run) -> None:
    # The first window is the start of the new file's documents, packed.
    stream = expected_stream(changed.trainer.tokenizer, documents_of(changed.files["documents"]))
    assert first_window(changed.trainer.train_dataset) == stream[:32] != first_window(default.trainer.train_dataset)


def check_val_files(default: Run, changed: Run) -> None:
    stream = expected_stream(changed.trainer.tokenizer, documents_of(changed.files["documents"]))
    assert first_window(changed.trainer.val_dataset) == stream[:32] != first_window(default.trainer.val_dataset)
    assert first_window(changed.trainer.train_dataset) == first_window(default.trainer.train_dataset)


def check_cache_dir(default: Run, changed: Run) -> None:
    for run, folder in ((default, "cache"), (changed, "other_cache")):
        cache = Path(run.trainer.train_dataset.tokens.filename)
        assert cache.is_file() and cache.is_relative_to(run.files[folder])


def check_strict(default: Run, changed: Run) -> None:
    # The file's second line is malformed: skipped and counted, or, strict, the run refuses to start.
    assert default.error is None and changed.trainer is None
    assert ".jsonl:2" in str(changed.error)


def check_seq_len(default: Run, changed: Run) -> None:
    limit = changed.trainer.config.data.seq_len
    assert max(changed.trainer.train_dataset.lengths) <= limit < max(default.trainer.train_dataset.lengths)


def check_prompt_val_files(default: Run, changed: Run) -> None:
    first = json.loads(changed.files["prompts"].read_text(encoding="utf-8").splitlines()[0])["prompt"]
    assert changed.trainer.val_dataset.prompts[0] == first != default.trainer.val_dataset.prompts[0]


def check_generation_tokens(default: Run, changed: Run) -> None:
    # The same model answers greedily: the shorter limit cuts the same replies (a character whose bytes the cut
    # splits decodes as U+FFFD).
    def replies(run: Run) -> list[str]:
        report = json.loads((run.out_dir / "generation_eval.json").read_text(encoding="utf-8"))
        return [example["prediction"] for example in report["examples"]]

    for short, full in zip(replies(changed), replies(default), strict=True):
        assert len(short) < len(full) and full.startswith(short.rstrip("\ufffd"))


# The rows this file runs, by key (and stage, where the stage reads the key itself).
ROWS = {
    "optim.grad_clip": Changed(0.01, check_grad_clip),
    "optim.weight_decay": Changed(0.25, check_weight_decay, fit=False),
    "train.gradient_checkpointing": Changed(True, check_gradient_checkpointing, fit=False),
    "train.precision": Changed("bf16", check_precision, fit=False),
    "train.seed": Changed(7, check_seed, fit=False),
    "train.compile": Changed(True, check_compile, fit=False),
    "train.device": Changed("cuda", check_device, fit=False),
    "eval.max_batches": Changed(3, check_max_batches),
    "eval.sample_prompts": Changed(["Once"], check_samples),
    "logging.sample_tokens": Changed(9, check_samples),
    "logging.sample_repetition_penalty": Changed(3.0, check_samples, also={"logging": {"sample_tokens": 12}}),
    "logging.swanlab_mode": Changed("offline", check_swanlab_mode),
    "logging.project": Changed("keys-audit", check_project, also={"logging": {"swanlab_mode": "offline"}}),
    "data.train_files": Changed(["{documents}"], check_train_files, fit=False),
    "data.val_files": Changed(["{documents}"], check_val_files, fit=False),
    "data.cache_dir": Changed("{other_cache}", check_cache_dir, fit=False),
    "data.strict": Changed(True, check_strict, fit=False, also={"data": {"train_files": ["{bad_documents}"]}}),
    "sft.data.seq_len": Changed(64, check_seq_len, fit=False, stage="sft"),
    "sft.data.strict": Changed(True, check_strict, fit=False, stage="sft",
                               also={"data": {"train_files": ["{bad_conversations}"]}}),
    # Hardly trained, the starting model's replies run to their limit.
    "sft.eval.generation_tokens": Changed(3, check_generation_tokens, stage="sft", also={
        "eval": {"generation_samples": 2}, "optim": {"lr": 1e-9, "min_lr": 1e-9}}),
    "dpo.data.seq_len": Changed(64, check_seq_len, fit=False, stage="dpo"),
    "grpo.data.val_files": Changed(["{prompts}"], check_prompt_val_files, fit=False, stage="grpo"),
}

# ------------------------------------------------------------------------------------------------- the table

TRAINER, SFT, RLHF, GRPO = (f"test/test_{name}.py::" for name in ("trainer", "model_sft_train", "model_rlhf_train",
                                                                    "model_rlhf_train_grpo"))
MODELING, GRPO_LOSS, TOKENIZER = "test/test_modeling.py::", "test/test_grpo.py::", "test/test_tokenizer_pretrain.py::"
CHANGED_TEST = "test/test_keys.py::test_a_changed_value_changes_its_observable"
MODEL_TESTS = "test/test_keys.py::test_a_model_key_reaches_the_model"
INIT_FROM_ALONE = "test/test_utils_config.py::test_model_keys_beside_init_from_are_refused"
BENCH_MODEL = "test/test_benchmark.py::test_bench_model_is_the_quick_dense_benchmark_with_its_options_after"


# The model section: a changed value reaches the model the engine builds (MODEL_VALUES below), and the model test
# that pins what the model does with it (each found failing when the model ignores the key).
MODEL = {
    "hidden_size": MODELING + "test_logits_and_loss_match_llama",
    "intermediate_size": MODELING + "test_logits_and_loss_match_llama",
    "num_hidden_layers": MODELING + "test_state_dict_keys_equal_llama",
    "num_attention_heads": MODELING + "test_state_dict_keys_equal_llama",
    "num_key_value_heads": MODELING + "test_state_dict_keys_equal_llama",
    "head_dim": "test/test_counting.py::test_parameter_counts_match_the_model_and_the_closed_forms",
    "hidden_act": "test/test_config.py::test_invalid_config_raises_value_error_naming_field_and_value",
    "max_position_embeddings": MODELING + "test_one_layer_dynamic_rope_matches_llama_on_each_prefix",
    "initializer_range": "test/test_moe.py::test_init_zero_bias_and_depth_scaled_down_proj",
    "rms_norm_eps": MODELING + "test_logits_and_loss_match_llama",
    "tie_word_embeddings": MODELING + "test_tied_embeddings_share_storage_and_survive_save_load",
    "rope_parameters": MODELING + "test_one_layer_dynamic_rope_matches_llama_on_each_prefix",
    "attention_bias": "test/test_attention.py::test_attention_bias",
    "attention_dropout": "test/test_attention.py::test_attention_dropout_only_in_training",
    "mlp_bias": "test/test_mlp.py::test_forward_and_gradients_match_llama",
    "sliding_window": MODELING + "test_sliding_window_logits_equal_mistral_and_cached_decoding_equals_the_full_forward",
    "layer_types": MODELING + "test_sliding_window_generate_equals_mistral_and_a_full_layer_keeps_everything",
    "parallel_residual": "test/test_decoder_layer.py::test_parallel_residual_hand_computed",
    "layer_scale_init": MODELING + "test_new_layer_scale_parameters_are_initialised_when_loading_a_dense_checkpoint",
    "drop_path_rate": "test/test_decoder_layer.py::test_model_drop_path_schedule_is_linear_over_depth",
    "num_experts": "test/test_moe.py::test_moe_layers_in_layer_order_and_bias_update_per_layer",
    "num_experts_per_tok": "test/test_moe.py::test_grouped_dispatch_matches_reference_forward_and_gradients",
    "moe_intermediate_size": "test/test_moe.py::test_expert_bias_is_a_persistent_buffer_not_a_parameter",
    "num_shared_experts": "test/test_moe.py::test_grouped_dispatch_matches_reference_forward_and_gradients",
    "decoder_sparse_step": "test/test_moe.py::test_moe_layers_in_layer_order_and_bias_update_per_layer",
    "moe_capacity_factor": "test/test_moe.py::test_capacity_drops_late_tokens_of_overloaded_experts",
    "scoring_func": "test/test_moe.py::test_router_scores_choices_and_weights",
    "norm_topk_prob": "test/test_moe.py::test_grouped_dispatch_matches_reference_forward_and_gradients",
    "router_aux_loss_coef": "test/test_moe.py::test_training_loss_adds_weighted_balancing_terms",
    "router_z_loss_coef": "test/test_moe.py::test_training_loss_adds_weighted_balancing_terms",
    "router_bias_update_rate": "test/test_router_monitor.py::test_expert_bias_moves_only_after_an_applied_step",
}
SEED_NAMES_TEST = "test/test_utils_config.py::test_seed_names_work_in_the_model_section_and_are_saved_canonically"
MODEL_KEYS = {
    **{f"--model.{key}": (f"{MODEL_TESTS}[{key}]", test) for key, test in MODEL.items()},
    **{f"--model.{alias}": (f"{MODEL_TESTS}[{alias}]", SEED_NAMES_TEST)
       for alias in (*ByteModelConfig.attribute_map, "moe_enabled")},
    "--model.init_from": (TRAINER + "test_init_from_a_saved_model", INIT_FROM_ALONE),
    "--model.attn_implementation": (
        "test/test_utils_config.py::test_model_attn_implementation_reaches_the_model_and_bad_names_are_one_line",
        MODELING + "test_a_registered_attention_function_is_called"),
}

# The keys of the one engine, whichever stage it runs.
TRAINING = {
    "--config": "test/test_utils_config.py::test_defaults_file_values_and_overrides",
    "--resume": "test/test_model_pretrain.py::test_sigterm_saves_a_checkpoint_and_resume_finishes",
    "--data.tokenizer": SFT + "test_an_explicit_tokenizer_wins_and_a_folder_without_one_is_an_input_error",
    "--data.num_workers": TRAINER + "test_streaming_with_two_workers_trains",
    "--train.out_dir": TRAINER + "test_short_run_writes_every_artefact",
    "--train.max_steps": TRAINER + "test_short_run_lowers_the_loss",
    "--train.epochs": TRAINER + "test_resume_at_an_epoch_boundary_and_epoch_mode",
    "--train.micro_batch_size": TRAINER + "test_short_run_lowers_the_loss",
    "--train.grad_accum_steps": TRAINER + "test_gradient_accumulation_matches_a_bigger_micro_batch",
    "--train.seed": ROWS["train.seed"],
    "--train.precision": ROWS["train.precision"],
    "--train.strategy": TRAINER + "test_ddp_and_fsdp_clip_the_global_gradient_to_exactly_grad_clip",
    "--train.compile": ROWS["train.compile"],
    "--train.gradient_checkpointing": ROWS["train.gradient_checkpointing"],
    "--train.device": ROWS["train.device"],
    "--train.max_bad_steps": TRAINER + "test_nan_steps_in_a_row_stop_the_run_with_the_last_good_weights",
    "--train.expert_parallel_size": (
        "test/test_expert_parallel.py::test_refusals_of_the_training_config",
        "test/test_expert_parallel.py::test_two_processes_layer_ddp_training_and_resume_across_sizes"),
    "--optim.lr": "test/test_optim.py::test_adamw_steps_equal_torchs_with_the_configured_decay_and_betas",
    "--optim.min_lr": "test/test_optim.py::test_schedule_warms_up_then_decays_to_min_lr",
    "--optim.warmup_steps": "test/test_optim.py::test_schedule_warms_up_then_decays_to_min_lr",
    "--optim.weight_decay": ("test/test_optim.py::test_adamw_steps_equal_torchs_with_the_configured_decay_and_betas",
                             ROWS["optim.weight_decay"]),
    "--optim.beta1": "test/test_optim.py::test_adamw_steps_equal_torchs_with_the_configured_decay_and_betas",
    "--optim.beta2": "test/test_optim.py::test_adamw_steps_equal_torchs_with_the_configured_decay_and_betas",
    "--optim.grad_clip": (ROWS["optim.grad_clip"],
                          TRAINER + "test_ddp_and_fsdp_clip_the_global_gradient_to_exactly_grad_clip"),
    "--checkpoint.every_steps": TRAINER + "test_short_run_writes_every_artefact",
    "--checkpoint.keep_last": TRAINER + "test_short_run_writes_every_artefact",
    "--eval.every_steps": TRAINER + "test_short_run_lowers_the_loss",
    "--eval.max_batches": ROWS["eval.max_batches"],
    "--eval.patience": TRAINER + "test_early_stopping_keeps_the_best_weights",
    "--eval.min_delta": TRAINER + "test_early_stopping_keeps_the_best_weights",
    "--eval.at_start": TRAINER + "test_every_evaluation_and_the_final_model_write_samples",
    "--eval.sample_prompts": ROWS["eval.sample_prompts"],
    "--logging.every_steps": TRAINER + "test_short_run_metrics_rows_and_schedule",
    "--logging.swanlab_mode": ROWS["logging.swanlab_mode"],
    "--logging.project": ROWS["logging.project"],
    "--logging.plots": "test/test_plots.py::test_training_refreshes_the_plots_at_every_evaluation_unless_told_not_to",
    "--logging.sample_tokens": ROWS["logging.sample_tokens"],
    "--logging.sample_repetition_penalty": ROWS["logging.sample_repetition_penalty"],
    "--lora.enabled": SFT + "test_lora_trains_only_adapters_and_the_merge_equals_the_adapted_model",
    "--lora.rank": "test/test_lora.py::test_lora_settings_reach_the_adapters",
    "--lora.alpha": "test/test_lora.py::test_lora_settings_reach_the_adapters",
    "--lora.dropout": "test/test_lora.py::test_lora_settings_reach_the_adapters",
    "--lora.target_modules": "test/test_lora.py::test_lora_settings_reach_the_adapters",
    **MODEL_KEYS,
}
BENCHMARK_TEST = "test/test_benchmark.py::test_each_option_reaches_what_the_benchmark_measures"
BENCHMARK = {
    **{option: f"{BENCHMARK_TEST}[{option}]" for option in (
        "--models", "--batch-size", "--seq-len", "--train-steps", "--rounds", "--prompt-len", "--new-tokens",
        "--generate-batches", "--sample-batch", "--generate-rounds", "--no-compile", "--inference-models",
        "--quantize", "--draft", "--inference-new-tokens", "--quality-windows", "--val-files", "--tokenizer", "--out",
        "--quick", "--attn-implementation")},
    **{option: "test/test_benchmark.py::test_grpo_rows_time_both_trainers_on_the_same_work"
       for option in ("--grpo-steps", "--grpo-prompts", "--grpo-generations", "--grpo-tokens")},
}


def each(test: str, options: tuple[str, ...], ids: Callable[[str], str] = str) -> dict[str, str]:
    """Rows of a test parametrized by option (its parameter id: `ids(option)`)."""
    return {option: f"{test}[{ids(option)}]" for option in options}


KEYS: dict[str, dict[str, str | Changed | tuple]] = {
    "model_pretrain.py": {
        **TRAINING,
        "--data.train_files": ROWS["data.train_files"],
        "--data.val_files": ROWS["data.val_files"],
        "--data.seq_len": TRAINER + "test_short_run_lowers_the_loss",
        "--data.strict": ROWS["data.strict"],
        "--data.text_field": "test/test_sources.py::test_text_field",
        "--data.cache_dir": ROWS["data.cache_dir"],
        "--data.streaming": TRAINER + "test_streaming_training_resumes_exactly",
    },
    "model_sft_train.py": {
        **TRAINING,
        "--data.train_files": SFT + "test_fine_tunes_from_a_saved_model",
        "--data.val_files": SFT + "test_fine_tunes_from_a_saved_model",
        "--data.seq_len": ROWS["sft.data.seq_len"],
        "--data.strict": ROWS["sft.data.strict"],
        "--eval.generation_samples": SFT + "test_fine_tunes_from_a_saved_model",
        "--eval.generation_tokens": ROWS["sft.eval.generation_tokens"],
    },
    "model_rlhf_train.py": {
        **TRAINING,
        # Pairs (dpo, ipo) or prompts (grpo): a row for each.
        "--data.train_files": (RLHF + "test_first_step_is_ln_2_and_the_rows_carry_the_preference_metrics",
                               GRPO + "test_a_run_writes_the_grpo_rows_samples_best_and_final"),
        "--data.val_files": (RLHF + "test_first_step_is_ln_2_and_the_rows_carry_the_preference_metrics",
                             ROWS["grpo.data.val_files"]),
        "--data.seq_len": (ROWS["dpo.data.seq_len"], GRPO + "test_bad_input_ends_with_one_line_and_exit_2"),
        "--data.strict": (RLHF + "test_bad_input_ends_with_one_line_and_exit_2",
                          GRPO + "test_bad_input_ends_with_one_line_and_exit_2"),
        "--rlhf.method": ("test/test_preference.py::test_loss_and_gradients_match_trl",
                          GRPO + "test_a_run_writes_the_grpo_rows_samples_best_and_final"),
        "--rlhf.beta": ("test/test_preference.py::test_loss_and_gradients_match_trl",
                        GRPO_LOSS + "test_loss_and_gradients_equal_trl"),
        "--rlhf.label_smoothing": "test/test_preference.py::test_conservative_dpo_through_the_model",
        "--rlhf.sft_weight": "test/test_preference.py::test_loss_and_gradients_match_trl",
        "--rlhf.reference_from": RLHF + "test_reference_from_is_the_model_the_policy_is_measured_against",
        "--rlhf.precompute_reference": RLHF + "test_precomputed_reference_is_stored_once_and_reused_on_resume",
        "--rlhf.reward_functions": GRPO + "test_reward_weights_and_scale_rewards_reach_the_rollout",
        "--rlhf.reward_weights": GRPO + "test_reward_weights_and_scale_rewards_reach_the_rollout",
        "--rlhf.num_generations": GRPO + "test_reward_weights_and_scale_rewards_reach_the_rollout",
        "--rlhf.prompts_per_step": GRPO + "test_a_run_stopped_by_a_signal_resumes_bitwise_equal_to_the_straight_run",
        "--rlhf.max_completion_tokens": (
            GRPO_LOSS + "test_loss_and_gradients_equal_trl",
            GRPO_LOSS + "test_rollouts_ignore_the_generation_settings_saved_with_the_model"),
        "--rlhf.temperature": (GRPO_LOSS + "test_rollouts_sample_with_the_sections_temperature_top_k_and_top_p",
                               GRPO_LOSS + "test_loss_and_gradients_equal_trl"),
        "--rlhf.top_p": GRPO_LOSS + "test_rollouts_sample_with_the_sections_temperature_top_k_and_top_p",
        "--rlhf.top_k": GRPO_LOSS + "test_rollouts_sample_with_the_sections_temperature_top_k_and_top_p",
        "--rlhf.scale_rewards": GRPO + "test_reward_weights_and_scale_rewards_reach_the_rollout",
        "--rlhf.loss_type": GRPO_LOSS + "test_loss_and_gradients_equal_trl",
        "--rlhf.epsilon": GRPO_LOSS + "test_loss_and_gradients_equal_trl",
        "--rlhf.epsilon_high": GRPO_LOSS + "test_loss_and_gradients_equal_trl",
        "--rlhf.num_iterations": GRPO + "test_a_run_stopped_by_a_signal_resumes_bitwise_equal_to_the_straight_run",
    },
    "tokenizer_pretrain.py": {
        "--config": "test/test_utils_config.py::test_defaults_file_values_and_overrides",
        **{f"--data.{key}": "test/test_tokenizer_pretrain.py::test_cli_trains_and_writes_report"
           for key in ("train_files", "val_files")},
        **each(TOKENIZER + "test_each_setting_reaches_the_trained_tokenizer", (
            "--tokenizer.vocab_size", "--tokenizer.min_frequency", "--tokenizer.bos_token", "--tokenizer.eos_token",
            "--tokenizer.pad_token", "--tokenizer.additional_special_tokens", "--tokenizer.model_max_length"),
            ids=lambda option: option.split(".")[1]),
        "--tokenizer.out_dir": "test/test_tokenizer_pretrain.py::test_cli_trains_and_writes_report",
        "--eval.report": "test/test_tokenizer_pretrain.py::test_cli_trains_and_writes_report",
    },
    "scripts/chat.py": each("test/test_chat.py::test_each_option_reaches_the_reply", (
        "--model", "--prompt", "--system", "--temperature", "--top-k", "--top-p", "--repetition-penalty",
        "--max-new-tokens", "--seed", "--compile", "--quantize", "--draft", "--attn-implementation",
        "--precision")),
    "scripts/serve.py": {
        **each("test/test_server.py::test_each_option_reaches_the_server", (
            "--model", "--host", "--port", "--api-key", "--model-name", "--max-batch-size", "--batch-window-ms",
            "--threads", "--quantize", "--attn-implementation", "--precision")),
        "--engine": ("test/test_server.py::test_each_option_reaches_the_server[--engine]",
                     "test/test_serving.py::test_a_request_joining_a_running_batch_answers_as_alone"),
        # What the engine does with them.
        "--max-batch-size": ("test/test_server.py::test_each_option_reaches_the_server[--max-batch-size]",
                             "test/test_serving.py::test_a_batch_waits_the_window_and_holds_at_most_max_batch_size"),
        "--batch-window-ms": ("test/test_server.py::test_each_option_reaches_the_server[--batch-window-ms]",
                              "test/test_serving.py::test_a_batch_waits_the_window_and_holds_at_most_max_batch_size"),
    },
    "scripts/export_hf.py": {
        "--model": "test/test_export_hf.py::test_export_gives_the_same_logits_and_greedy_tokens_without_the_project",
        "--out": "test/test_export_hf.py::test_export_gives_the_same_logits_and_greedy_tokens_without_the_project",
        "--dtype": "test/test_export_hf.py::test_bf16_export_holds_the_cast_weights",
        "--force": "test/test_export_hf.py::test_force_replaces_a_non_empty_out_and_leaves_no_temporary_folder",
    },
    "scripts/export_gguf.py": {
        "--model": "test/test_export_gguf.py::test_every_tensor_has_llama_cpp_name_shape_type_and_the_source_values",
        "--out": "test/test_export_gguf.py::test_every_tensor_has_llama_cpp_name_shape_type_and_the_source_values",
        "--dtype": "test/test_export_gguf.py::test_every_tensor_has_llama_cpp_name_shape_type_and_the_source_values",
        "--tokenizer": "test/test_export_gguf.py::test_llama_cpp_tokenizes_text_and_chats_as_our_tokenizer",
        "--force": "test/test_export_gguf.py::test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary",
    },
    "utils/model_info.py": {
        "--config": "test/test_model_info.py::test_main_with_a_config_writes_report_json_and_plots",
        "--model": "test/test_model_info.py::test_main_with_a_saved_model_adds_weight_statistics",
        "--seq-len": "test/test_model_info.py::test_main_options_seq_len_batch_size_and_name",
        "--batch-size": "test/test_model_info.py::test_main_options_seq_len_batch_size_and_name",
        "--out": "test/test_model_info.py::test_main_options_seq_len_batch_size_and_name",
        "--name": "test/test_model_info.py::test_main_options_seq_len_batch_size_and_name",
        "--data": "test/test_model_info.py::test_routing_reads_the_data_and_the_tokenizer_it_is_given",
        "--tokenizer": "test/test_model_info.py::test_routing_reads_the_data_and_the_tokenizer_it_is_given",
        "--routing-tokens": "test/test_model_info.py::test_moe_model_report_shows_routing",
    },
    "scripts/benchmark.py": BENCHMARK,
    "scripts/bench_model.py": {option: (row, BENCH_MODEL) for option, row in BENCHMARK.items()},
    "scripts/bench_moe.py": {
        **each("test/test_benchmark.py::test_each_option_reaches_what_bench_moe_measures", (
            "--hidden-size", "--layers", "--heads", "--kv-heads", "--experts", "--top-k", "--expert-size",
            "--vocab-size", "--batch-size", "--seq-len", "--train-steps", "--layer-repeats", "--rounds")),
        "--output": "test/test_benchmark.py::test_bench_moe_writes_its_output_where_told",
    },
    "scripts/bench_serve.py": {
        **each("test/test_benchmark.py::test_each_option_reaches_what_bench_serve_measures", (
            "--model", "--url", "--engines", "--api-key", "--requests", "--clients", "--max-tokens", "--lengths",
            "--threads", "--endpoint", "--data")),
        "--output": "test/test_benchmark.py::test_bench_serve_writes_its_table_where_told",
    },
    "scripts/bench_data.py": {
        **{option: "test/test_bench_data.py::test_bench_data_times_every_format_on_the_same_tokens"
           for option in ("--documents", "--sizes", "--output")},
        **{option: "test/test_bench_data.py::test_each_option_reaches_what_bench_data_measures"
           for option in ("--config", "--rounds", "--batches", "--train-steps")},
    },
    "scripts/plot_runs.py": {
        "--metric": "test/test_plots.py::test_plot_runs_prints_the_table_and_refuses_bad_input_in_one_line",
        "--out": "test/test_plots.py::test_plot_runs_prints_the_table_and_refuses_bad_input_in_one_line",
    },
    "scripts/prepare_demo_data.py": {
        "--out": "test/test_prepare_demo_data.py::test_out_is_where_every_file_is_written",
        "--seed": "test/test_prepare_demo_data.py::test_seed_changes_the_samples_and_splits",
        "--max-mb": "test/test_prepare_demo_data.py::test_max_mb_bounds_the_pretraining_and_sft_files",
    },
    "scripts/jsonl_to_sqlite.py": {
        "--db": "test/test_sources.py::test_jsonl_to_sqlite_round_trip",
        "--table": "test/test_sources.py::test_jsonl_to_sqlite_writes_the_table_it_is_told",
    },
}
KEYS["model_sft_train.py"]["--model.init_from"] = KEYS["model_rlhf_train.py"]["--model.init_from"] = (
    SFT + "test_fine_tunes_from_a_saved_model", INIT_FROM_ALONE)

# A value of each model key other than its default (with what it needs beside it), and the field it sets.
MOE = {"num_experts": 4}
MODEL_VALUES = {
    "hidden_size": {"hidden_size": 64}, "intermediate_size": {"intermediate_size": 96},
    "num_hidden_layers": {"num_hidden_layers": 3}, "num_attention_heads": {"num_attention_heads": 2},
    "num_key_value_heads": {"num_key_value_heads": 1}, "head_dim": {"head_dim": 16},
    "max_position_embeddings": {"max_position_embeddings": 128}, "initializer_range": {"initializer_range": 0.05},
    "rms_norm_eps": {"rms_norm_eps": 1e-5}, "tie_word_embeddings": {"tie_word_embeddings": True},
    "rope_parameters": {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0}},
    "attention_bias": {"attention_bias": True}, "attention_dropout": {"attention_dropout": 0.1},
    "mlp_bias": {"mlp_bias": True}, "parallel_residual": {"parallel_residual": True},
    "sliding_window": {"sliding_window": 8},
    "layer_types": {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
    "layer_scale_init": {"layer_scale_init": 0.1}, "drop_path_rate": {"drop_path_rate": 0.1},
    "num_experts": MOE, "num_experts_per_tok": {**MOE, "num_experts_per_tok": 1},
    "moe_intermediate_size": {**MOE, "moe_intermediate_size": 16},
    "num_shared_experts": {**MOE, "num_shared_experts": 1}, "decoder_sparse_step": {**MOE, "decoder_sparse_step": 2},
    "moe_capacity_factor": {**MOE, "moe_capacity_factor": 1.5},
    "scoring_func": {**MOE, "scoring_func": "sigmoid"}, "norm_topk_prob": {**MOE, "norm_topk_prob": False},
    "router_aux_loss_coef": {"router_aux_loss_coef": 0.5}, "router_z_loss_coef": {"router_z_loss_coef": 0.001},
    "router_bias_update_rate": {**MOE, "router_bias_update_rate": 0.01},
    # The seed project's names.
    "model_dim": {"model_dim": 64}, "num_layers": {"num_layers": 3}, "hidden_dim": {"hidden_dim": 96},
    "num_heads": {"num_heads": 2}, "num_kv_heads": {"num_kv_heads": 1}, "max_seq_len": {"max_seq_len": 128},
    "norm_eps": {"norm_eps": 1e-5}, "moe_num_experts": {"moe_num_experts": 4},
    "moe_k": {"moe_num_experts": 4, "moe_k": 1}, "moe_enabled": {**MOE, "moe_enabled": False},
}
TINY_MODEL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64}


# ------------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("key", [*sorted(MODEL_VALUES), "hidden_act"])
def test_a_model_key_reaches_the_model(key):
    """The model section's value reaches the model the engine builds (through model_config_from, as
    Trainer.build_model): the field differs from the default, and holds the value given."""
    if key == "hidden_act":  # silu is the only activation (SwiGLU): anything else is refused by name
        with pytest.raises(InputError, match="hidden_act must be 'silu'"):
            model_config_from(build_config(TrainingConfig, {"model": {"hidden_act": "gelu"}}).model, vocab_size=128)
        return
    values = {**TINY_MODEL, **MODEL_VALUES[key]}
    if "model_dim" in values or "num_layers" in values or "num_heads" in values or "num_kv_heads" in values \
            or "max_seq_len" in values:
        for alias, name in ByteModelConfig.attribute_map.items():
            if alias in values:
                values.pop(name, None)
    field_name = ByteModelConfig.attribute_map.get(key, "num_experts" if key == "moe_enabled" else key)
    expected = 0 if key == "moe_enabled" else MODEL_VALUES[key][key]
    built = ByteModel(model_config_from(build_config(TrainingConfig, {"model": values}).model, vocab_size=128))
    default = ByteModel(model_config_from(build_config(TrainingConfig, {"model": {
        **TINY_MODEL, **({"num_experts": 4} if key == "moe_enabled" else {})}}).model, vocab_size=128))
    assert getattr(built.config, field_name) == expected != getattr(default.config, field_name)



def changed_rows() -> dict[str, Changed]:
    """Every Changed row of the table, by stage and key (`sft.data.seq_len`)."""
    rows = {}
    for options in KEYS.values():
        for option, row in options.items():
            for entry in row if isinstance(row, tuple) else (row,):
                if isinstance(entry, Changed):
                    name = f"{entry.stage}.{option[2:]}"
                    assert rows.setdefault(name, entry) is entry, f"{name}: two different rows"
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """What the rows name: a tiny starting model, a token cache, and small data files (some with a bad record)."""
    root = tmp_path_factory.mktemp("keys")
    documents = [line for line in (DEMO / "pretrain_val.jsonl").read_text(encoding="utf-8").splitlines()][:40]
    conversations = (DEMO / "sft_val.jsonl").read_text(encoding="utf-8").splitlines()[:20]
    prompts = (DEMO / "arithmetic_val.jsonl").read_text(encoding="utf-8").splitlines()
    return {"start": save_tiny_start(root / "start"), "cache": root / "cache", "other_cache": root / "other-cache",
            "documents": write_lines(root / "documents.jsonl", documents[::-1]),
            "bad_documents": write_lines(root / "bad_documents.jsonl", [documents[0], "{cut", *documents[1:]]),
            "bad_conversations": write_lines(root / "bad_conversations.jsonl", [conversations[0], "{cut",
                                                                                 *conversations[1:]]),
            "prompts": write_lines(root / "prompts.jsonl", prompts[::-1])}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, files):
    """The run at every default (with a row's shared overrides), once per stage and kind of run."""
    runs = {}

    def run(row: Changed) -> Run:
        key = (row.stage, repr(row.also), row.fit)
        if key not in runs:
            runs[key] = stage_run(row.stage, tmp_path_factory.mktemp("default") / "out", files, row.also, row.fit)
        return runs[key]

    with project_logger_restored():
        yield run


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # dynamo's import
@pytest.mark.parametrize("name", sorted(changed_rows()))
def test_a_changed_value_changes_its_observable(name, default_run, tmp_path, files):
    row = changed_rows()[name]
    section, key = name.split(".", 1)[1].split(".")
    sections = {**row.also, section: {**row.also.get(section, {}), key: row.value}}
    default = default_run(row)
    assert default.error is None, default.error
    with project_logger_restored():
        changed = stage_run(row.stage, tmp_path / "out", files, sections, row.fit)
    row.check(default, changed)


# ------------------------------------------------------------------------------------------- rows for every option

def scripts() -> list[str]:
    """Every runnable script: the entry points, scripts/ and the utils modules run as programs."""
    paths = [*ROOT.glob("*.py"), *(ROOT / "scripts").glob("*.py"), *(ROOT / "utils").glob("*.py")]
    return sorted(str(path.relative_to(ROOT)) for path in paths
                  if 'if __name__ == "__main__"' in path.read_text(encoding="utf-8"))


@cache
def listed_options(script: str) -> tuple[str, ...]:
    """What `python SCRIPT --help` lists: its options, its configuration keys and their other accepted names."""
    path, stdout = ROOT / script, io.StringIO()
    argv, search_path = sys.argv, list(sys.path)
    sys.argv = [str(path), "--help"]
    sys.path.insert(0, str(path.parent))  # as python puts a script's folder first
    try:
        with contextlib.redirect_stdout(stdout), pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = argv, search_path
    assert exit_info.value.code in (0, None), script
    text = stdout.getvalue()
    options = [option for option in re.findall(r"^  (?:-\w, )?(--[\w.-]+)", text, re.MULTILINE) if option != "--help"]
    for section, names in re.findall(r"^  \(also accepted in (\w+): ([^)]*)\)", text, re.MULTILINE):
        options += [f"--{section}.{name}" for name in names.split(", ")]
    return tuple(options)


def test_every_script_has_its_rows():
    assert scripts() == sorted(KEYS)


@pytest.mark.parametrize("script", sorted(KEYS))
def test_every_listed_option_has_a_row(script):
    """A new option needs a row naming the test that covers it; a row whose option is gone goes with it."""
    listed = listed_options(script)
    assert len(listed) == len(set(listed)), script
    missing, stale = sorted(set(listed) - set(KEYS[script])), sorted(set(KEYS[script]) - set(listed))
    assert not missing and not stale, f"{script}: no row for {missing}; rows for options it lacks: {stale}"


def named_tests() -> set[str]:
    names = set()
    for options in KEYS.values():
        for row in options.values():
            for entry in row if isinstance(row, tuple) else (row,):
                names.add(entry if isinstance(entry, str) else f"{CHANGED_TEST}[{entry.stage}.{key_of(entry)}]")
    return names


def key_of(row: Changed) -> str:
    return next(name for name, entry in changed_rows().items() if entry is row).split(".", 1)[1]


def collected_elsewhere(files: set[str]) -> set[str]:
    """The node ids of test files this session did not collect, collected by pytest in a process of its own."""
    existing = sorted(name for name in files if (ROOT / name).is_file())
    if not existing:
        return set()
    listing = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              *existing], cwd=ROOT, capture_output=True, text=True, timeout=600)
    return {line.strip() for line in listing.stdout.splitlines() if "::" in line}


def test_every_named_test_exists(request):
    names = named_tests()
    collected = set(request.config.stash.get(COLLECTED, set()))
    files = {name.split("::")[0] for name in names}
    collected |= collected_elsewhere({name for name in files if not any(node.startswith(f"{name}::")
                                                                        for node in collected)})
    absent = sorted(name for name in names if name not in collected
                    and not any(node.startswith(f"{name}[") for node in collected))
    assert not absent, f"rows name tests that do not exist: {absent}"
