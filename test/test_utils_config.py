"""utils/config.py: YAML + --section.key overrides into typed dataclasses, with one-line errors."""

from dataclasses import dataclass, field

import pytest
import yaml

from utils.config import InputError, build_config, parse_config, save_config


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
    assert not list((tmp_path / "run").glob("*.tmp"))
