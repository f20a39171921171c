"""utils/config.py: YAML + --section.key overrides into typed dataclasses, with one-line errors."""

import dataclasses
from dataclasses import dataclass, field

import pytest
import yaml

from utils.config import ModelSection, build_config, model_config_from, parse_config, save_config
from utils.errors import InputError


@dataclass
class Train:
    max_steps: int = 10
    lr: float = 1e-3
    compile: bool = False
    out_dir: str = "out"
    files: list[str] = field(default_factory=lambda: ["a.jsonl"])
    warmup: int | None = None


@dataclass
class Schema:
    train: Train = field(default_factory=Train)


def write_yaml(tmp_path, values) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_defaults_file_values_and_overrides(tmp_path):
    path = write_yaml(tmp_path, {"train": {"max_steps": 5, "lr": 3}})
    config, arguments = parse_config(Schema, None, "test", ["--config", path, "--train.compile", "true",
                                                            "--train.out_dir=runs/x", "--train.warmup", "7"])
    assert arguments.config == path
    assert config.train == Train(max_steps=5, lr=3.0, compile=True, out_dir="runs/x", warmup=7)
    assert isinstance(config.train.lr, float)


def test_override_values_are_yaml_scalars_and_lists():
    config, _ = parse_config(Schema, None, "test", ["--train.files", "[x.jsonl, y.jsonl]", "--train.lr", "1e-4",
                                                    "--train.warmup", "null"])
    assert config.train.files == ["x.jsonl", "y.jsonl"]
    assert config.train.lr == pytest.approx(1e-4)
    assert config.train.warmup is None
    config, _ = parse_config(Schema, None, "test", ["--train.files", "single.jsonl"])
    assert config.train.files == ["single.jsonl"]


@pytest.mark.parametrize("argv, message", [
    (["--train.max_step", "3"], "unknown key 'train.max_step'; valid keys in train: max_steps, lr, compile"),
    (["--optim.lr", "3"], "unknown section 'optim'; valid sections: train"),
    (["--train.max_steps", "3.5"], "train.max_steps must be int, got 3.5"),
    (["--train.max_steps", "true"], "train.max_steps must be int, got True"),
    (["--train.compile", "maybe"], "train.compile must be bool, got 'maybe'"),
    (["--train.max_steps"], "missing value for --train.max_steps"),
    (["stray"], "unexpected argument 'stray'"),
    (["--config", "/nonexistent/config.yaml"], "config file not found"),
])
def test_bad_input_raises_input_error_naming_the_key(argv, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_config(Schema, None, "test", argv)


def test_bad_yaml_files(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(InputError, match="invalid YAML"):
        parse_config(Schema, None, "test", ["--config", str(broken)])
    with pytest.raises(InputError, match="section 'train' must be a mapping"):
        build_config(Schema, {"train": 3})
    with pytest.raises(InputError, match="must be a mapping of sections"):
        parse_config(Schema, None, "test", ["--config", write_yaml(tmp_path, [1, 2])])


def test_help_lists_every_key_with_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(Schema, None, "test", ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key, default in [("train.max_steps", "10"), ("train.lr", "0.001"), ("train.files", "['a.jsonl']")]:
        assert f"--{key}" in out and f"default: {default}" in out


def test_save_config_round_trips(tmp_path):
    config, _ = parse_config(Schema, None, "test", ["--train.max_steps", "42"])
    save_config(config, tmp_path / "run" / "config.yaml")
    loaded, _ = parse_config(Schema, None, "test", ["--config", str(tmp_path / "run" / "config.yaml")])
    assert loaded == config
    assert [path.name for path in (tmp_path / "run").iterdir()] == ["config.yaml"]  # no temporary left behind


# ---------------------------------------------------------------- the training scripts' schema


def test_the_model_section_is_byte_model_config_itself():
    from model import ByteModelConfig
    from utils.config import NOT_IN_MODEL_SECTION, ModelSection, model_config_from

    section = ModelSection()
    expected = {name for name in ByteModelConfig.__annotations__ if name not in NOT_IN_MODEL_SECTION}
    assert set(vars(section)) == expected | {"init_from", "attn_implementation"}
    built = model_config_from(section, vocab_size=6400)
    reference = ByteModelConfig()  # the same defaults, by construction
    for name in expected:
        assert getattr(built, name) == getattr(reference, name), name


@pytest.mark.parametrize("argv", [
    ["--model.moe_enabled", "true", "--model.moe_num_experts", "4", "--model.moe_k", "2"],
    ["--model.num_experts", "4", "--model.num_experts_per_tok", "2"],
])
def test_seed_names_work_in_the_model_section_and_are_saved_canonically(tmp_path, argv):
    from utils.config import TrainingConfig, model_config_from

    config, _ = parse_config(TrainingConfig, None, "test", argv + ["--model.model_dim", "128"])
    assert (config.model.num_experts, config.model.num_experts_per_tok, config.model.hidden_size) == (4, 2, 128)
    save_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]
    assert saved["num_experts"] == 4 and saved["hidden_size"] == 128
    assert not {"moe_enabled", "moe_num_experts", "moe_k", "model_dim"} & set(saved)
    assert model_config_from(config.model, vocab_size=100).moe_enabled


@pytest.mark.parametrize("argv, message", [
    (["--model.moe_enabled", "true"], "section 'model': moe_enabled needs moe_num_experts (num_experts) > 0"),
    (["--model.model_dim", "64", "--model.hidden_size", "128"],
     "section 'model': model_dim and hidden_size name the same field: give one of them"),
    (["--train.precision", "fp8"], "train.precision must be one of 'auto', 'fp32', 'bf16', 'fp16', got 'fp8'"),
    (["--train.strategy", "zero3"], "train.strategy must be one of 'ddp', 'fsdp', got 'zero3'"),
    (["--train.compile", "sometimes"], "train.compile must be bool | auto, got 'sometimes'"),
    (["--logging.swanlab_mode", "online"], "logging.swanlab_mode must be one of 'offline', 'local', 'cloud', "
                                           "'disabled', got 'online'"),
    (["--model.scoring_func", "relu"], "model.scoring_func must be one of 'softmax', 'sigmoid', got 'relu'"),
])
def test_the_training_schema_rejects_bad_choices_and_conflicting_names(argv, message):
    from utils.config import TrainingConfig

    with pytest.raises(InputError) as error:
        parse_config(TrainingConfig, None, "test", argv)
    assert str(error.value) == message


def test_moe_enabled_false_switches_the_experts_off():
    from utils.config import TrainingConfig

    config, _ = parse_config(TrainingConfig, None, "test", ["--model.num_experts", "4", "--model.moe_enabled", "false"])
    assert config.model.num_experts == 0
    config, _ = parse_config(TrainingConfig, None, "test", ["--train.compile", "auto", "--train.precision", "bf16"])
    assert (config.train.compile, config.train.precision) == ("auto", "bf16")


@pytest.mark.parametrize("schema, argv, message", [
    ("TrainingConfig", ["--eval.generation_samples", "8"], "unknown key 'eval.generation_samples'"),
    ("PreferenceConfig", ["--eval.generation_tokens", "8"], "unknown key 'eval.generation_tokens'"),
    ("SFTConfig", ["--data.cache_dir", "elsewhere"], "unknown key 'data.cache_dir'"),
    ("SFTConfig", ["--data.streaming", "true"], "unknown key 'data.streaming'"),
    ("PreferenceConfig", ["--data.streaming", "true"], "unknown key 'data.streaming'"),
    ("PreferenceConfig", ["--data.text_field", "body"], "unknown key 'data.text_field'"),
])
def test_a_stage_refuses_the_keys_only_another_stage_reads(schema, argv, message):
    """Pretraining alone reads documents through a cache or a stream; SFT alone answers validation conversations
    at the end. An old config naming such a key elsewhere gets one line instead of a key that does nothing."""
    import utils.config

    with pytest.raises(InputError, match=message):
        parse_config(getattr(utils.config, schema), None, "test", argv)


@pytest.mark.parametrize("method, key, value", [
    *(("dpo", key, value) for key, value in (("reward_functions", ["utils.rewards:format_reward"]),
                                             ("reward_weights", [2.0]), ("num_generations", 4),
                                             ("prompts_per_step", 2), ("max_completion_tokens", 8),
                                             ("temperature", 0.5), ("top_p", 0.9), ("top_k", 5),
                                             ("scale_rewards", "none"), ("loss_type", "grpo"), ("epsilon", 0.1),
                                             ("epsilon_high", 0.3), ("num_iterations", 2))),
    ("ipo", "num_generations", 4),
    *(("grpo", key, value) for key, value in (("label_smoothing", 0.1), ("sft_weight", 0.5),
                                              ("precompute_reference", True))),
])
def test_rlhf_keys_of_the_other_kind_of_method_are_refused(tmp_path, method, key, value):
    from utils.config import GRPO_KEYS, OFFLINE_KEYS, PreferenceConfig, build_config, check_training_config

    assert key in (GRPO_KEYS if method != "grpo" else OFFLINE_KEYS)
    rlhf = {"method": method, key: value}
    if method == "grpo":
        rlhf["reward_functions"] = ["utils.rewards:format_reward"]
    config = build_config(PreferenceConfig, {"model": {"init_from": str(tmp_path)}, "rlhf": rlhf})
    with pytest.raises(InputError, match=f"rlhf.{key} applies to {'dpo/ipo' if method == 'grpo' else 'grpo'}, "
                                         f"not {method}"):
        check_training_config(config)


def test_every_grpo_key_and_every_offline_key_is_named():
    """The two lists split the rlhf keys after `method`, `beta` and `reference_from`, which all methods read."""
    from utils.config import GRPO_KEYS, OFFLINE_KEYS, RlhfSection

    names = [entry.name for entry in dataclasses.fields(RlhfSection)]
    assert sorted(names) == sorted(["method", "beta", "reference_from", *OFFLINE_KEYS, *GRPO_KEYS])


def test_a_grpo_reference_without_the_kl_term_is_refused(tmp_path):
    from utils.config import PreferenceConfig, build_config, check_training_config

    config = build_config(PreferenceConfig, {"model": {"init_from": str(tmp_path)}, "rlhf": {
        "method": "grpo", "beta": 0.0, "reward_functions": ["utils.rewards:format_reward"],
        "reference_from": str(tmp_path)}})
    with pytest.raises(InputError, match="rlhf.reference_from needs rlhf.beta > 0"):
        check_training_config(config)


def test_model_attn_implementation_reaches_the_model_and_bad_names_are_one_line():
    from model import ByteModel

    for name in ("sdpa", "eager"):
        config = model_config_from(ModelSection(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                                attn_implementation=name), vocab_size=32)
        assert ByteModel(config).config._attn_implementation == name
    for name, reason in (("nonsense", "is not supported"), ("flash_attention_2", "Flash Attention 2")):
        with pytest.raises(InputError, match=f"model.attn_implementation '{name}': .*{reason}") as error:
            model_config_from(ModelSection(attn_implementation=name), vocab_size=32)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("key, value", [("hidden_size", 128), ("attention_dropout", 0.1), ("num_experts", 4)])
def test_model_keys_beside_init_from_are_refused(tmp_path, key, value):
    """The starting model keeps the architecture it was saved with: a model key beside it would do nothing."""
    from utils.config import TrainingConfig, build_config, check_training_config

    check_training_config(build_config(TrainingConfig, {"model": {"init_from": str(tmp_path)}}))
    config = build_config(TrainingConfig, {"model": {"init_from": str(tmp_path), key: value}})
    with pytest.raises(InputError, match=f"model.{key} does not apply with model.init_from"):
        check_training_config(config)
    # The attention function is not part of the architecture: a starting model runs with the one asked for.
    check_training_config(build_config(TrainingConfig, {"model": {"init_from": str(tmp_path),
                                                                  "attn_implementation": "eager"}}))
