"""YAML configuration loaded into typed dataclasses, with `--section.key value` command-line overrides.

Every script declares its configuration as a dataclass whose fields are section dataclasses, then calls
`parse_config`. The YAML file and the overrides are checked against the declared fields and types, so a typo or a
wrong type is reported with the key's name and the valid keys instead of surfacing later as a strange failure.
"""

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import yaml

from model.config import ByteModelConfig
from utils.distributed import rank_and_world_size
from utils.errors import InputError, error_summary
from utils.expert_parallel import check_expert_parallel
from utils.files import write_atomically


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "|".join(str(choice).lower() if isinstance(choice, bool) else str(choice)
                        for choice in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation (int, float, bool, str, list[...], X | None), converting only where
    no information is lost (int -> float, a single string -> a one-element list)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except InputError as error:
                errors.append(error)
        if len(errors) > 1:
            raise InputError(f"{key} must be {_type_name(annotation)}, got {value!r}")
        raise errors[0]
    if origin is list:
        (item_type,) = typing.get_args(annotation) or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise InputError(f"{key} must be a list, got {value!r}")
        return [_coerce(item, item_type, f"{key}[{index}]") for index, item in enumerate(value)]
    if annotation is Any:
        return value
    if origin is typing.Literal:
        if any(value == choice and type(value) is type(choice) for choice in typing.get_args(annotation)):
            return value
        raise InputError(f"{key} must be one of {', '.join(map(repr, typing.get_args(annotation)))}, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, which reads `1e-4` (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif annotation is dict:
        if isinstance(value, dict):
            return value
    else:
        raise TypeError(f"unsupported config type {annotation!r} for {key}")
    raise InputError(f"{key} must be {_type_name(annotation)}, got {value!r}")


def _field_types(dataclass_type: type) -> dict[str, Any]:
    hints = typing.get_type_hints(dataclass_type)
    return {field.name: hints[field.name] for field in dataclasses.fields(dataclass_type)}


def build_config(schema: type, values: dict[str, Any]) -> Any:
    """Build `schema` (a dataclass of section dataclasses) from a nested dict, checking every key and type."""
    if not isinstance(values, dict):
        raise InputError(f"the configuration must be a mapping of sections, got {type(values).__name__}")
    sections = _field_types(schema)
    unknown = sorted(set(values) - set(sections))
    if unknown:
        raise InputError(f"unknown section '{unknown[0]}'; valid sections: {', '.join(sections)}")
    built = {}
    for section_name, section_type in sections.items():
        section_values = values.get(section_name) or {}
        if not isinstance(section_values, dict):
            raise InputError(f"section '{section_name}' must be a mapping, got {section_values!r}")
        fields = _field_types(section_type)
        if hasattr(section_type, "canonical_names"):
            try:
                section_values = section_type.canonical_names(section_values)
            except ValueError as error:
                raise InputError(f"section '{section_name}': {error}") from None
        unknown = sorted(set(section_values) - set(fields))
        if unknown:
            raise InputError(f"unknown key '{section_name}.{unknown[0]}'; valid keys in {section_name}: "
                             f"{', '.join(fields)}")
        checked = {name: _coerce(value, fields[name], f"{section_name}.{name}") for name, value in section_values.items()}
        try:
            built[section_name] = section_type(**checked)
        except (TypeError, ValueError) as error:
            raise InputError(f"section '{section_name}': {error}") from None
    return schema(**built)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved configuration as YAML, whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True))


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML configuration file as a dict of sections (empty file: empty dict)."""
    if not path.is_file():
        raise InputError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise InputError(f"{path}: invalid YAML: {error_summary(error)}") from None
    if not isinstance(values, dict):
        raise InputError(f"{path}: the configuration must be a mapping of sections")
    return values


def _describe_keys(schema: type) -> str:
    lines = ["configuration keys (override any with --section.key VALUE; values are YAML scalars):"]
    for section_name, section_type in _field_types(schema).items():
        for entry in dataclasses.fields(section_type):
            default = entry.default if entry.default is not dataclasses.MISSING else (
                entry.default_factory() if entry.default_factory is not dataclasses.MISSING else "required")
            annotation = _field_types(section_type)[entry.name]
            lines.append(f"  --{section_name}.{entry.name} ({_type_name(annotation)}, default: {default!r})")
        if hasattr(section_type, "aliases"):
            lines.append(f"  (also accepted in {section_name}: {', '.join(section_type.aliases)})")
    return "\n".join(lines)


def parse_config(schema: type, default_config: str | None, description: str, argv: list[str] | None = None,
                 add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                 ) -> tuple[Any, argparse.Namespace]:
    """Parse `--config FILE` and `--section.key value` overrides into a checked `schema` instance.

    Returns the configuration and the parsed script arguments: `--config` plus whatever `add_arguments` declares
    (for example `--resume`). Raises InputError for a missing file, bad YAML, an unknown key or a wrong type.
    """
    parser = argparse.ArgumentParser(description=description, epilog=_describe_keys(schema),
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--config", default=default_config, help=f"YAML file (default: {default_config})")
    if add_arguments is not None:
        add_arguments(parser)
    arguments, rest = parser.parse_known_args(argv)

    values = read_yaml(Path(arguments.config)) if arguments.config is not None else {}

    index = 0
    while index < len(rest):
        option = rest[index]
        if not option.startswith("--") or "." not in option:
            raise InputError(f"unexpected argument '{option}'; overrides look like --section.key VALUE (see --help)")
        key, has_value, value_text = option[2:].partition("=")
        if not has_value:
            if index + 1 >= len(rest):
                raise InputError(f"missing value for --{key}")
            index += 1
            value_text = rest[index]
        section_name, _, field_name = key.partition(".")
        try:
            value = yaml.safe_load(value_text)
        except yaml.YAMLError:
            value = value_text
        section = values.setdefault(section_name, {})
        if not isinstance(section, dict):
            raise InputError(f"section '{section_name}' must be a mapping")
        section[field_name] = value
        index += 1
    return build_config(schema, values), arguments


# ---------------------------------------------------------------- the training scripts' configuration

# Decided by the tokenizer (vocabulary, special token ids) or at run time, never by the model section.
NOT_IN_MODEL_SECTION = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache")


def _model_section() -> type:
    """The YAML model section: ByteModelConfig's own fields with its types and defaults (one definition of the
    model), plus `init_from`. The seed project's names are accepted and stored under the canonical ones."""
    defaults = ByteModelConfig.__dataclass_fields__
    fields = [(name, annotation, field(default=defaults[name].default))
              for name, annotation in ByteModelConfig.__annotations__.items() if name not in NOT_IN_MODEL_SECTION]
    # A model folder to start from (this project's final/, a Llama or Mixtral folder) instead of random weights.
    fields.append(("init_from", str | None, field(default=None)))
    # The attention function (transformers' attention interface): sdpa, eager, or one registered with
    # AttentionInterface. Not part of the saved model: a folder loads with whichever the loader asks for.
    fields.append(("attn_implementation", str, field(default="sdpa")))
    return dataclasses.make_dataclass("ModelSection", fields, namespace={
        "__doc__": "ByteModelConfig's fields; vocabulary and special token ids come from the tokenizer.",
        "canonical_names": staticmethod(ByteModelConfig.canonical_names),
        "aliases": (*ByteModelConfig.attribute_map, "moe_enabled")})


ModelSection = _model_section()


@dataclass
class DataSection:
    """What every stage reads its data with."""
    # Files, folders, glob patterns (JSONL, Parquet, plain text) and sqlite:///file.db?table=NAME databases
    train_files: list[str] = field(default_factory=lambda: ["datasets/demo/pretrain_train.jsonl"])
    val_files: list[str] = field(default_factory=lambda: ["datasets/demo/pretrain_val.jsonl"])
    tokenizer: str | None = None  # None: model.init_from's own tokenizer when it has one, else tokenizer/
    seq_len: int = 256
    strict: bool = False
    num_workers: int = 0


@dataclass
class PretrainDataSection(DataSection):
    """Pretraining reads documents from one field, through a token cache or streamed (the other stages read
    conversations, pairs or prompts, which they tokenize in memory)."""
    text_field: str = "text"  # the field (column) that holds a pretraining document's text
    cache_dir: str = ".cache/data"
    streaming: bool = False  # read and tokenize train_files lazily (corpora too big to cache); needs max_steps


@dataclass
class TrainSection:
    out_dir: str = "out/pretrain"
    max_steps: int | None = 400
    epochs: int = 1  # used when max_steps is null
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    strategy: Literal["ddp", "fsdp"] = "ddp"
    compile: bool | Literal["auto"] = "auto"  # auto: on where it measured faster (bf16 autocast or CUDA, no MoE)
    gradient_checkpointing: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"  # cuda: each process takes the GPU of its local rank
    max_bad_steps: int = 5
    expert_parallel_size: int = 1  # processes that split each MoE layer's experts between them (1: all hold all)


@dataclass
class OptimSection:
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 40
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0


@dataclass
class CheckpointSection:
    every_steps: int = 100
    keep_last: int = 3


@dataclass
class EvalSection:
    every_steps: int = 50
    max_batches: int = 20
    patience: int = 0  # evaluations without improvement before stopping; 0 never stops early
    min_delta: float = 0.0
    at_start: bool = False  # also evaluate the starting model, before the first step (not counted as a best)
    # Continued greedily at every evaluation and by final/ (chat stages: as user turns), into samples.jsonl.
    sample_prompts: list[str] = field(default_factory=lambda: ["The", "我们"])


@dataclass
class SFTEvalSection(EvalSection):
    generation_samples: int = 0  # validation conversations answered by the final model for BLEU/ROUGE/METEOR
    generation_tokens: int = 64


@dataclass
class LoggingSection:
    every_steps: int = 10
    swanlab_mode: Literal["offline", "local", "cloud", "disabled"] = "offline"
    project: str = "stellarbyte"
    plots: bool = True  # redraw out_dir/plots/ from metrics.jsonl at every evaluation and at the end
    sample_tokens: int = 48  # length of the samples of eval.sample_prompts
    sample_repetition_penalty: float = 1.2  # divides the scores of tokens already in a sample; 1 = plain greedy


@dataclass
class LoraSection:
    """Low-rank adapters through peft; checkpoints then hold only the adapters, final/ the merged model."""
    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])


@dataclass
class TrainingConfig:
    """A training run's configuration: pretraining's, whose sections the other stages share except where a
    subclass gives its own (each stage lists only the keys it reads)."""
    model: ModelSection = field(default_factory=ModelSection)
    data: PretrainDataSection = field(default_factory=PretrainDataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    lora: LoraSection = field(default_factory=LoraSection)


@dataclass
class RlhfSection:
    """The preference stage's objective: offline methods learn from fixed preference pairs (dpo, ipo); grpo samples
    the policy's own replies to prompts and learns from their rewards (the keys after `precompute_reference`)."""
    method: Literal["dpo", "ipo", "grpo"] = "dpo"
    beta: float = 0.1  # strength of the pull towards the reference model (grpo: weight of the KL term, 0 = none)
    label_smoothing: float = 0.0  # dpo only: assumed share of flipped labels (conservative DPO)
    sft_weight: float = 0.0  # weight of the chosen reply's NLL added to the loss (RPO)
    reference_from: str | None = None  # null: the starting model (model.init_from), or the policy without adapters
    precompute_reference: bool = False  # reference log-probabilities once before training: one model in memory
    reward_functions: list[str] = field(default_factory=list)  # grpo: "module:function" paths, TRL's signature
    reward_weights: list[float] | None = None  # one per reward function; null: all 1
    num_generations: int = 8  # completions sampled per prompt (the group its advantages are measured in)
    prompts_per_step: int = 4  # prompts per process per rollout
    max_completion_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    scale_rewards: Literal["group", "batch", "none"] = "group"  # advantages divided by the group's or batch's std
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"  # how token losses are normalised
    epsilon: float = 0.2  # the ratio is clipped to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # null: epsilon
    num_iterations: int = 1  # optimizer steps on each rollout batch


@dataclass
class SFTConfig(TrainingConfig):
    data: DataSection = field(default_factory=DataSection)
    eval: SFTEvalSection = field(default_factory=SFTEvalSection)


@dataclass
class PreferenceConfig(TrainingConfig):
    data: DataSection = field(default_factory=DataSection)
    rlhf: RlhfSection = field(default_factory=RlhfSection)


def check_training_config(config: TrainingConfig) -> None:
    """What the typed config cannot say: ranges and combinations."""
    for key in ("train.micro_batch_size", "train.grad_accum_steps", "checkpoint.every_steps", "eval.every_steps",
                "logging.every_steps", "train.max_bad_steps", "train.epochs"):
        section, name = key.split(".")
        if getattr(getattr(config, section), name) < 1:
            raise InputError(f"{key} must be >= 1, got {getattr(getattr(config, section), name)}")
    if config.train.max_steps is not None and config.train.max_steps < 1:
        raise InputError(f"train.max_steps must be >= 1 or null, got {config.train.max_steps}")
    penalty = config.logging.sample_repetition_penalty
    if penalty <= 0:
        raise InputError(f"logging.sample_repetition_penalty must be > 0, got {penalty}")
    if config.optim.lr <= 0:
        raise InputError(f"optim.lr must be > 0, got {config.optim.lr}")
    if not 0 <= config.optim.min_lr <= config.optim.lr:
        raise InputError(f"optim.min_lr must be in [0, optim.lr], got {config.optim.min_lr}")
    check_attn_implementation(config.model.attn_implementation, "model.attn_implementation")
    if config.model.init_from is not None:
        defaults = ModelSection()
        for name, value in vars(config.model).items():
            if name not in ("init_from", "attn_implementation") and value != getattr(defaults, name):
                raise InputError(f"model.{name} does not apply with model.init_from: the starting model keeps the "
                                 f"architecture it was saved with")
    expert_parallel = config.train.expert_parallel_size
    check_expert_parallel(expert_parallel, rank_and_world_size()[1],
                          config.model.num_experts if config.model.init_from is None else None)
    if expert_parallel > 1 and config.lora.enabled:
        raise InputError("train.expert_parallel_size > 1 does not work with LoRA (the merged final model would hold "
                         "one process's experts)")
    lora = config.lora
    if lora.enabled:
        if lora.rank < 1 or lora.alpha <= 0 or not 0 <= lora.dropout < 1:
            raise InputError("lora needs rank >= 1, alpha > 0 and 0 <= dropout < 1")
        if not lora.target_modules:
            raise InputError("lora.target_modules is empty")
        if config.train.strategy == "fsdp":
            raise InputError("LoRA runs with train.strategy=ddp (the adapters are small: sharding them gains nothing)")
    if isinstance(config, PreferenceConfig):
        rlhf = config.rlhf
        if config.model.init_from is None:
            raise InputError("the preference stage starts from a trained model: set model.init_from "
                             "(e.g. out/sft/final)")
        if rlhf.method == "grpo":
            check_grpo_section(config)
            if expert_parallel > 1:
                raise InputError("train.expert_parallel_size > 1 does not work with grpo (each process samples "
                                 "rollouts of its own length, and every forward needs all of its row)")
        else:
            if rlhf.beta <= 0:
                raise InputError(f"rlhf.beta must be > 0, got {rlhf.beta}")
            refuse_keys_of_another_method(rlhf, GRPO_KEYS, "grpo")
        if not 0 <= rlhf.label_smoothing < 0.5:
            raise InputError(f"rlhf.label_smoothing must be in [0, 0.5), got {rlhf.label_smoothing}")
        if rlhf.label_smoothing and rlhf.method != "dpo":
            raise InputError(f"rlhf.label_smoothing applies to method dpo only, not {rlhf.method}")
        if rlhf.sft_weight < 0:
            raise InputError(f"rlhf.sft_weight must be >= 0, got {rlhf.sft_weight}")
        for key, folder in (("model.init_from", config.model.init_from), ("rlhf.reference_from", rlhf.reference_from)):
            if folder is not None and not Path(folder).is_dir():
                raise InputError(f"{key}: folder not found: {folder}")


def check_grpo_section(config: PreferenceConfig) -> None:
    rlhf = config.rlhf
    if rlhf.beta < 0:
        raise InputError(f"rlhf.beta must be >= 0 for grpo (0: no KL term, no reference model), got {rlhf.beta}")
    if rlhf.num_generations < 2:
        raise InputError(f"rlhf.num_generations must be >= 2 (advantages compare a prompt's completions), "
                         f"got {rlhf.num_generations}")
    for key in ("prompts_per_step", "max_completion_tokens", "num_iterations"):
        if getattr(rlhf, key) < 1:
            raise InputError(f"rlhf.{key} must be >= 1, got {getattr(rlhf, key)}")
    if rlhf.temperature <= 0 or not 0 < rlhf.top_p <= 1 or rlhf.top_k < 0:
        raise InputError("rlhf needs temperature > 0, 0 < top_p <= 1 and top_k >= 0 (0: off)")
    if rlhf.epsilon < 0 or (rlhf.epsilon_high is not None and rlhf.epsilon_high < 0):
        raise InputError("rlhf.epsilon and rlhf.epsilon_high must be >= 0")
    if not rlhf.reward_functions:
        raise InputError("rlhf.reward_functions is empty: grpo needs at least one \"module:function\"")
    if rlhf.reward_weights is not None and len(rlhf.reward_weights) != len(rlhf.reward_functions):
        raise InputError(f"rlhf.reward_weights has {len(rlhf.reward_weights)} values for "
                         f"{len(rlhf.reward_functions)} reward functions")
    refuse_keys_of_another_method(rlhf, OFFLINE_KEYS, "dpo/ipo")
    if rlhf.beta == 0 and rlhf.reference_from is not None:
        raise InputError("rlhf.reference_from needs rlhf.beta > 0 with grpo (without the KL term there is no reference "
                         "model)")
    if config.train.grad_accum_steps != 1:
        raise InputError("grpo takes a step's micro-batches from its rollout (rlhf.prompts_per_step x "
                         "rlhf.num_generations completions in micro-batches of train.micro_batch_size): leave "
                         "train.grad_accum_steps at 1")


# The rlhf keys that only the offline methods (dpo, ipo) or only grpo read.
OFFLINE_KEYS = ("label_smoothing", "sft_weight", "precompute_reference")
GRPO_KEYS = ("reward_functions", "reward_weights", "num_generations", "prompts_per_step", "max_completion_tokens",
             "temperature", "top_p", "top_k", "scale_rewards", "loss_type", "epsilon", "epsilon_high", "num_iterations")


def refuse_keys_of_another_method(rlhf: RlhfSection, keys: tuple[str, ...], methods: str) -> None:
    """A key the method in use does not read, set away from its default, is an input error rather than ignored."""
    defaults = RlhfSection()
    for key in keys:
        if getattr(rlhf, key) != getattr(defaults, key):
            raise InputError(f"rlhf.{key} applies to {methods}, not {rlhf.method}")


def resolve_tokenizer(config: TrainingConfig) -> str:
    """An explicit data.tokenizer; else the starting model's own (model.init_from), else the demo tokenizer."""
    explicit, init_from = config.data.tokenizer, config.model.init_from
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


def check_attn_implementation(name: str, where: str) -> None:
    """Refuse, in one line, an attention implementation that ByteModel cannot run (transformers decides: unknown
    names, kernels not installed or not supported by the model)."""
    from model import ByteModel

    tiny = ByteModelConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                           intermediate_size=8)
    tiny._attn_implementation = name
    try:
        with torch.device("meta"):  # transformers checks the name while building; no weights, no random numbers
            ByteModel(tiny)
    except (ValueError, ImportError) as error:
        raise InputError(f"{where} {name!r}: {str(error).strip().splitlines()[0]}") from None


def model_config_from(section: ModelSection, tokenizer=None, vocab_size: int | None = None):
    """The ByteModelConfig of a model section plus what the tokenizer decides: vocabulary size and special token
    ids (or just `vocab_size`, where only the shapes matter)."""
    fields = {key: value for key, value in dataclasses.asdict(section).items() if key != "init_from"}
    check_attn_implementation(fields["attn_implementation"], "model.attn_implementation")
    if tokenizer is not None:
        fields.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    elif vocab_size is not None:
        fields["vocab_size"] = vocab_size
    try:
        return ByteModelConfig(**fields)
    except ValueError as error:
        raise InputError(f"model: {error}") from None
