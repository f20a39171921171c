"""tokenizer_pretrain.py: training, round trips, special tokens, chat template, bad input."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import tokenizer_pretrain
from tokenizer_pretrain import ROUND_TRIP_SAMPLES, TokenizerSection, save_atomically, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CORPUS = [
    "Hello world, this is a tiny corpus for a tokenizer test.",
    "今天天气很好，我们去公园散步吧。机器学习需要数据。",
    "def add(a, b):\n    return a + b\n",
    "Emoji are bytes too 🎉👍 and so is mixed 中文 text.",
] * 50


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tok") / "tokenizer"
    save_atomically(train_tokenizer(CORPUS, TokenizerSection(vocab_size=400)), out_dir)
    return AutoTokenizer.from_pretrained(out_dir), out_dir


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(path.name.encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def run_script(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tokenizer_pretrain.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_loads_with_special_tokens(trained):
    tokenizer, out_dir = trained
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<|SPAD|>", "<|SBOS|>", "<|SEOS|>")
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert len(tokenizer) == 400
    for marker in ("<|system|>", "<|user|>", "<|assistant|>", "<|SEOS|>"):
        assert len(tokenizer.encode(marker, add_special_tokens=False)) == 1, marker
    assert (out_dir / "tokenizer.json").is_file()


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_SAMPLES))
def test_round_trip_is_exact(trained, name):
    tokenizer, _ = trained
    text = ROUND_TRIP_SAMPLES[name]
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_round_trip_of_unseen_characters(trained):
    tokenizer, _ = trained
    text = "Ünïcödé ∑ ∫ 𝔘 ﷽ \x00\x7f 한국어 العربية \t\n  "
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert max(ids) < len(tokenizer)


def test_training_learns_merges(trained):
    tokenizer, _ = trained
    # Frequent words become single tokens, so the corpus compresses well below one token per byte.
    text = CORPUS[0]
    assert len(tokenizer.encode(text, add_special_tokens=False)) < len(text.encode()) / 2


def test_chat_template(trained):
    tokenizer, _ = trained
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "Hi!"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|SBOS|><|system|>Be brief.<|SEOS|>\n<|user|>你好<|SEOS|>\n<|assistant|>Hi!<|SEOS|>\n")
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|SBOS|><|system|>Be brief.<|SEOS|>\n<|user|>你好<|SEOS|>\n<|assistant|>"
    ids = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert tokenizer.decode(ids) == prompt


def test_chat_template_rejects_unknown_role(trained):
    tokenizer, _ = trained
    with pytest.raises(Exception, match="unknown role"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "beep"}], tokenize=False)


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    out_dir = tmp_path / "tokenizer"
    tokenizer = train_tokenizer(CORPUS, TokenizerSection(vocab_size=300))
    save_atomically(tokenizer, out_dir)
    before = folder_digest(out_dir)

    def failing_save(directory, *args, **kwargs):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "tokenizer.json").write_text("{half")
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", failing_save)
    with pytest.raises(OSError):
        save_atomically(tokenizer, out_dir)
    assert folder_digest(out_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.slow
def test_cli_trains_and_writes_report(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": text} for text in CORPUS])
    conversations = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": [
        {"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hello!"}]}] * 10)
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "今天我们学习。"}, {"text": "Hello tokenizer."}])
    result = run_script("--data.train_files", f"[{train}, {conversations}]", "--data.val_files", str(val),
                        "--tokenizer.vocab_size", "350", "--tokenizer.out_dir", str(tmp_path / "tok"),
                        "--eval.report", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["vocab_size"] == 350
    assert all(row["exact"] for row in report["round_trip"].values())
    assert report["held_out"]["chinese"]["documents"] == 1
    assert report["held_out"]["english_and_code"]["documents"] == 1
    assert 0 < report["vocabulary_use"]["fraction_used_on_train"] <= 1
    assert AutoTokenizer.from_pretrained(tmp_path / "tok").eos_token == "<|SEOS|>"


@pytest.fixture
def existing_tokenizer(tmp_path):
    out_dir = tmp_path / "tok"
    save_atomically(train_tokenizer(CORPUS, TokenizerSection(vocab_size=300)), out_dir)
    return out_dir, folder_digest(out_dir)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "empty", "vocab", "malformed", "no_text", "unknown_key", "bad_type"])
def test_bad_input_exits_2_without_touching_output(tmp_path, existing_tokenizer, case):
    out_dir, before = existing_tokenizer
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": text} for text in CORPUS[:8]])
    args = {"train": str(good), "vocab": "300"}
    expected = {
        "missing": "data file not found",
        "empty": "no text found",
        "vocab": "smaller than the byte alphabet plus special tokens",
        "malformed": "bad.jsonl:3: malformed JSON",
        "no_text": "no text found",
        "unknown_key": "unknown key 'tokenizer.vocab'",
        "bad_type": "tokenizer.vocab_size must be int",
    }[case]
    extra = []
    if case == "missing":
        args["train"] = str(tmp_path / "absent.jsonl")
    elif case == "empty":
        (tmp_path / "empty.jsonl").write_text("")
        args["train"] = str(tmp_path / "empty.jsonl")
    elif case == "vocab":
        args["vocab"] = "200"
    elif case == "malformed":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": "broken\n')
        args["train"] = str(bad)
    elif case == "no_text":
        args["train"] = str(write_jsonl(tmp_path / "other.jsonl", [{"title": "no text field"}]))
    elif case == "unknown_key":
        extra = ["--tokenizer.vocab", "300"]
    elif case == "bad_type":
        args["vocab"] = "lots"
    result = run_script("--data.train_files", args["train"], "--data.val_files", "[]", "--tokenizer.vocab_size",
                        args["vocab"], "--tokenizer.out_dir", str(out_dir),
                        "--eval.report", str(tmp_path / "report.json"), *extra)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and expected in result.stderr, result.stderr
    assert folder_digest(out_dir) == before
    assert not (tmp_path / "report.json").exists()


def test_shipped_tokenizer_loads():
    folder = ROOT / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        pytest.fail("the trained tokenizer/ folder is missing: run python tokenizer_pretrain.py")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == 6400
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.chat_template == tokenizer_pretrain.CHAT_TEMPLATE
    for text in ROUND_TRIP_SAMPLES.values():
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
