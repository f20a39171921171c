"""utils/config.py: YAML + --section.key overrides into typed dataclasses, with one-line errors."""

from dataclasses import dataclass, field

import pytest
import yaml

from utils.config import build_config, parse_config, save_config
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
    assert set(vars(section)) == expected | {"init_from"}
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
