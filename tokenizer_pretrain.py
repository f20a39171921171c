"""Train StellarByte's byte-level BPE tokenizer: `python tokenizer_pretrain.py [--config configs/tokenizer.yaml]`.

Writes a standard Hugging Face tokenizer folder (loadable with `AutoTokenizer.from_pretrained`) with bos/eos/pad
tokens and a chat template, then evaluates it on the held-out files: exact round trips, characters per token
per language and vocabulary use, printed as a table and saved as JSON.
"""

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from utils.cjk import CJK_UNIFIED_IDEOGRAPHS
from utils.config import parse_config
from utils.data import ROLES, document_texts, read_records
from utils.errors import InputError, exit_on_input_error
from utils.files import publish_folder, write_atomically
from utils.sources import TextSource, data_sources

# Every turn is `<|role|>{content}{eos}\n`; the generation prompt opens an assistant turn. The content follows the
# role marker directly: a special token ends a BPE segment, so a reply is tokenized the same way whether or not it
# follows the prompt (a "\n" there would merge with a reply's leading spaces). The reply's end token is eos, so
# generation stops there and SFT trains the reply plus exactly that token.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in " + str(list(ROLES)) + " %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ ': use " + ", ".join(ROLES[:-1]) + " or " + ROLES[-1]
    + "') }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHINESE = re.compile(f"[{CJK_UNIFIED_IDEOGRAPHS}]")  # what makes a held-out document count as Chinese
ROUND_TRIP_SAMPLES = {
    "chinese": "今天天气很好，我们去公园散步吧。机器学习模型需要大量的数据。",
    "english": "The quick brown fox jumps over the lazy dog. Tokenizers split text into sub-word units.",
    "code": "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n\treturn fibonacci(n - 1) + fibonacci(n - 2)  # ok\n",
    "emoji": "Great job! 🎉👍🏽 See you soon 👋🌍 ❤️‍🔥",
    "mixed": "Python 3.11 的 f-string 很好用：print(f'{x!r}') 😀\r\n  double  spaces\u00a0and a trailing space ",
}


@dataclass
class DataSection:
    train_files: list[str] = field(default_factory=lambda: ["datasets/demo/pretrain_train.jsonl",
                                                              "datasets/demo/sft_train.jsonl"])
    val_files: list[str] = field(default_factory=lambda: ["datasets/demo/pretrain_val.jsonl"])


@dataclass
class TokenizerSection:
    vocab_size: int = 6400
    min_frequency: int = 2
    bos_token: str = "<|SBOS|>"
    eos_token: str = "<|SEOS|>"
    pad_token: str = "<|SPAD|>"
    additional_special_tokens: list[str] = field(default_factory=list)
    model_max_length: int = 1024
    out_dir: str = "tokenizer"


@dataclass
class EvalSection:
    report: str = "model_info/tokenizer_evaluation.json"


@dataclass
class TokenizerTrainingConfig:
    data: DataSection = field(default_factory=DataSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    eval: EvalSection = field(default_factory=EvalSection)


def special_tokens(config: TokenizerSection) -> list[str]:
    """Ids in this order: pad 0, bos 1, eos 2, then the role markers and any additional tokens."""
    tokens = [config.pad_token, config.bos_token, config.eos_token, *(f"<|{role}|>" for role in ROLES),
              *config.additional_special_tokens]
    duplicates = sorted({token for token in tokens if tokens.count(token) > 1})
    if duplicates:
        raise InputError(f"special tokens must be distinct, {duplicates[0]!r} appears twice")
    return tokens


def read_texts(paths: list[str]) -> list[str]:
    """All document texts of the given sources: records' `text` or conversations (JSONL, Parquet, SQLite), or the
    paragraphs of plain-text files; a source without any text is an error."""
    texts = []
    for source in data_sources(paths):
        if isinstance(source, TextSource):
            file_texts = [part for part in Path(source.path).read_text(encoding="utf-8").split("\n\n") if part.strip()]
        else:
            file_texts = [text for _, record in read_records([source]) for text in document_texts(record)
                          if text.strip()]
        if not file_texts:
            raise InputError(f"{source}: no text found (empty, or no 'text'/'conversations' fields)")
        texts.extend(file_texts)
    return texts


def check_settings(config: TokenizerSection) -> None:
    """Reject settings that cannot produce a tokenizer before any data is read."""
    specials = special_tokens(config)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(alphabet) + len(specials)
    if config.vocab_size < minimum:
        raise InputError(f"tokenizer.vocab_size={config.vocab_size} is smaller than the byte alphabet plus special "
                         f"tokens ({len(alphabet)} + {len(specials)} = {minimum})")
    if config.min_frequency < 1:
        raise InputError(f"tokenizer.min_frequency must be >= 1, got {config.min_frequency}")
    if config.model_max_length < 1:
        raise InputError(f"tokenizer.model_max_length must be >= 1, got {config.model_max_length}")


def train_tokenizer(texts: list[str], config: TokenizerSection) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with settings that passed check_settings."""
    specials = special_tokens(config)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Byte-level BPE without a normaliser: every byte string round-trips exactly (code, emoji, any script).
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                                  special_tokens=specials, initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=config.bos_token, eos_token=config.eos_token,
        pad_token=config.pad_token, additional_special_tokens=config.additional_special_tokens or None,
        chat_template=CHAT_TEMPLATE, model_max_length=config.model_max_length, clean_up_tokenization_spaces=False,
    )


def save_atomically(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Write into a temporary sibling folder, then swap it in: an interrupted run never leaves a half-written
    tokenizer, and the previous one is only removed once the new one is complete."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        tokenizer.save_pretrained(temporary)
        publish_folder(temporary, out_dir)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def chinese_share(text: str) -> float:
    visible = [char for char in text if not char.isspace()]
    return len(CHINESE.findall(text)) / max(1, len(visible))


def evaluate(tokenizer, train_texts: list[str], val_texts: list[str]) -> dict:
    round_trips = {}
    for name, text in ROUND_TRIP_SAMPLES.items():
        ids = tokenizer.encode(text)
        round_trips[name] = {"exact": tokenizer.decode(ids) == text, "characters": len(text), "tokens": len(ids)}

    # Held-out documents are grouped by script: a document is Chinese when a fifth of its visible characters are.
    groups = {"chinese": [], "english_and_code": []}
    for text in val_texts:
        groups["chinese" if chinese_share(text) >= 0.2 else "english_and_code"].append(text)
    encoded_val = tokenizer(val_texts, add_special_tokens=False, verbose=False)["input_ids"]
    by_text = dict(zip(val_texts, encoded_val))
    characters_per_token = {}
    for name, texts in groups.items():
        characters = sum(len(text) for text in texts)
        tokens = sum(len(by_text[text]) for text in texts)
        characters_per_token[name] = {"documents": len(texts), "characters": characters, "tokens": tokens,
                                      "characters_per_token": round(characters / tokens, 3) if tokens else None}

    vocab_size = len(tokenizer)
    used_train = {token for ids in tokenizer(train_texts, add_special_tokens=False, verbose=False)["input_ids"] for token in ids}
    used_val = {token for ids in encoded_val for token in ids}
    return {
        "vocab_size": vocab_size,
        "round_trip": round_trips,
        "held_out": characters_per_token,
        "vocabulary_use": {
            "used_on_train": len(used_train), "used_on_held_out": len(used_val),
            "fraction_used_on_train": round(len(used_train) / vocab_size, 4),
            "fraction_used_on_held_out": round(len(used_val) / vocab_size, 4),
        },
    }


def print_report(report: dict, console: Console) -> None:
    table = Table(title=f"Tokenizer evaluation (vocabulary {report['vocab_size']})")
    for column in ("check", "result", "characters", "tokens", "chars/token"):
        table.add_column(column, justify="left" if column in ("check", "result") else "right")
    for name, row in report["round_trip"].items():
        table.add_row(f"round trip: {name}", "exact" if row["exact"] else "MISMATCH", str(row["characters"]),
                      str(row["tokens"]), f"{row['characters'] / row['tokens']:.2f}")
    for name, row in report["held_out"].items():
        ratio = "-" if row["characters_per_token"] is None else f"{row['characters_per_token']:.2f}"
        table.add_row(f"held-out: {name}", f"{row['documents']} docs", str(row["characters"]), str(row["tokens"]),
                      ratio)
    use = report["vocabulary_use"]
    table.add_row("vocabulary used (train)", f"{use['fraction_used_on_train']:.1%}", "", str(use["used_on_train"]), "")
    table.add_row("vocabulary used (held-out)", f"{use['fraction_used_on_held_out']:.1%}", "",
                  str(use["used_on_held_out"]), "")
    console.print(table)


@exit_on_input_error
def main() -> None:
    config, _ = parse_config(TokenizerTrainingConfig, "configs/tokenizer.yaml", __doc__.splitlines()[0])
    console = Console()
    start = time.perf_counter()
    check_settings(config.tokenizer)
    train_texts = read_texts(config.data.train_files)
    val_texts = read_texts(config.data.val_files) if config.data.val_files else []
    console.print(f"training on {len(train_texts)} documents ({sum(map(len, train_texts)) / 1e6:.2f}M characters), "
                  f"vocabulary {config.tokenizer.vocab_size}")
    tokenizer = train_tokenizer(train_texts, config.tokenizer)
    out_dir = Path(config.tokenizer.out_dir)
    save_atomically(tokenizer, out_dir)
    console.print(f"saved to {out_dir}/ in {time.perf_counter() - start:.1f}s")

    loaded = AutoTokenizer.from_pretrained(out_dir)  # evaluate what users will load, not the in-memory object
    report = evaluate(loaded, train_texts, val_texts)
    report["seconds"] = round(time.perf_counter() - start, 2)
    report_path = Path(config.eval.report)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(report_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print_report(report, console)
    console.print(f"report written to {report_path}")


if __name__ == "__main__":
    main()
