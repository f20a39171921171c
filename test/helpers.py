"""Shared helpers: tiny model configs, the equivalent transformers LlamaConfig, weight utilities; repository paths,
the demo tokenizer's special ids and data-file helpers for the data tests; putting the project logger back."""

import contextlib
import io
import json
import logging
import os
from pathlib import Path

import torch
from transformers import LlamaConfig

from model import ByteModelConfig
from utils.errors import exit_on_input_error
from utils.logger import LOGGER_NAME, quiet_transformers

ATOL = 1e-5
# Parameter gradients sum over every token, so they are O(10): compare them with a relative term as well.
GRAD_TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_config(**overrides) -> ByteModelConfig:
    """A ByteModelConfig small enough for CPU tests (vocab 128, hidden 64, 2 layers, 4 heads, 2 kv heads)."""
    kwargs = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64)
    kwargs.update(overrides)
    return ByteModelConfig(**kwargs)


def save_tiny_start(folder: Path) -> Path:
    """A tiny random ByteModel with the demo tokenizer (its vocabulary and special tokens), saved to `folder` with
    that tokenizer: a starting model (`model.init_from`) for the preference stage's tests."""
    from transformers import AutoTokenizer

    from model import ByteModel

    tokenizer = AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "tokenizer")
    torch.manual_seed(0)
    ByteModel(tiny_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          max_position_embeddings=128)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def overridden(config_values: dict, sections: dict[str, dict]) -> dict:
    """A nested config dict with each section's overrides laid over that section (a section it lacks is added)."""
    return {**config_values, **{section: {**config_values.get(section, {}), **overrides}
                                for section, overrides in sections.items()}}


def cli_arguments(config_values: dict) -> list[str]:
    """A nested config dict as a training script's `--section.key=VALUE` overrides."""
    return [f"--{section}.{key}={json.dumps(value)}" for section, entries in config_values.items()
            for key, value in entries.items()]


def script_environment(*paths: Path) -> dict[str, str]:
    """The environment of a training script run as a subprocess: the repository (and `paths`) importable, one
    thread per process."""
    root = Path(__file__).resolve().parents[1]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (root, *paths))), "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def llama_config_from(config: ByteModelConfig, attn_implementation: str = "sdpa") -> LlamaConfig:
    """A transformers LlamaConfig with exactly the same architecture fields as `config`."""
    llama = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=dict(config.rope_parameters),
        tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=config.attention_bias,
        attention_dropout=config.attention_dropout,
        mlp_bias=config.mlp_bias,
        initializer_range=config.initializer_range,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )
    llama._attn_implementation = attn_implementation
    return llama


@torch.no_grad()
def randomize_(module: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Give every parameter (norm weights and biases included) random values, so that comparisons exercise them.
    Norm weights are drawn around 1; everything else around 0 with `std`."""
    for name, param in module.named_parameters():
        if name.endswith("norm.weight"):
            param.copy_(1.0 + 0.2 * torch.randn_like(param))
        else:
            param.copy_(std * torch.randn_like(param))
    return module


def additive_mask(bool_mask: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """Turn a (batch, 1, q, kv) bool mask (True = attend) into the additive float mask eager attention expects."""
    if bool_mask is None:
        return None
    return torch.zeros(bool_mask.shape, dtype=dtype).masked_fill(~bool_mask, torch.finfo(dtype).min)


def causal_bool_mask(query_length: int, past_length: int = 0, batch: int = 1) -> torch.Tensor:
    """Explicit (batch, 1, q, past + q) causal bool mask."""
    q = torch.arange(past_length, past_length + query_length)[:, None]
    k = torch.arange(past_length + query_length)[None, :]
    return (k <= q)[None, None].expand(batch, 1, query_length, past_length + query_length)


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}


ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "datasets" / "demo"
PAD, BOS, EOS = 0, 1, 2


def write_lines(path: Path, lines: list) -> Path:
    """Write records (dumped as JSON) or raw strings, one per line."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
                            for line in lines), encoding="utf-8")
    return path


def expected_stream(tokenizer, texts: list[str], eos: int = EOS) -> list[int]:
    """The packed token stream written by hand: each document's ids without specials, then EOS."""
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False).input_ids + [eos]
    return stream


def unpack(dataset) -> list[int]:
    """Rebuild the token stream from the windows: the first input token, then every window's targets."""
    stream = [int(dataset[0]["input_ids"][0])]
    for index in range(len(dataset)):
        stream += dataset[index]["shift_labels"].tolist()
    return stream


TWO_TURNS = [{"role": "user", "content": "What is 2 + 3?"},
             {"role": "assistant", "content": "2 + 3 = 5.\nAnything else?"}]
MULTI_TURNS = [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": "你好，请介绍一下你自己。"},
               {"role": "assistant", "content": "我是一个小模型，可以回答简单的问题。"},
               {"role": "user", "content": "Write a Python function that adds two numbers."},
               {"role": "assistant", "content": "def add(a, b):\n    return a + b"}]


@contextlib.contextmanager
def project_logger_restored():
    """setup_logger changes the project logger for the whole process (handlers on a test's captured stderr and its
    train.log): put it back afterwards."""
    logger = logging.getLogger(LOGGER_NAME)
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    try:
        yield
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        for handler in handlers:
            logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def run_script_main(main, arguments: list[str]) -> tuple[int, str, str]:
    """What `python scripts/<script>.py ARGUMENTS` runs, in this process, for a script whose `main(argv)` its
    `__main__` block wraps in exit_on_input_error: (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            quiet_transformers()
            exit_on_input_error(lambda: main(arguments))()
            code = 0
        except SystemExit as stop:
            code = stop.code
    return code, stdout.getvalue(), stderr.getvalue()
