"""tokenizer_pretrain.py: training, round trips, special tokens, chat template, bad input."""

import contextlib
import hashlib
import io
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


def one_special_token(token: str, token_id: int):
    return lambda tokenizer: (tokenizer.convert_ids_to_tokens(token_id) == token
                              and tokenizer.encode(token, add_special_tokens=False) == [token_id])


# A tokenizer setting -> a value other than its default, and what is true of a tokenizer trained with it (and false
# of one trained with the default).
SETTINGS = {
    "vocab_size": (350, lambda tokenizer: len(tokenizer) == 350),
    # A merge must be seen more often than the corpus's 50 copies of each word: few are, the vocabulary stays short.
    "min_frequency": (51, lambda tokenizer: len(tokenizer) < 300),
    "bos_token": ("<s>", lambda tokenizer: tokenizer.bos_token == "<s>" and tokenizer.bos_token_id == 1
                  and tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)[:3] == "<s>"),
    "eos_token": ("</s>", lambda tokenizer: tokenizer.eos_token == "</s>" and tokenizer.eos_token_id == 2),
    "pad_token": ("<pad>", lambda tokenizer: tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 0),
    "additional_special_tokens": (["<|tool|>"], one_special_token("<|tool|>", 3 + len(tokenizer_pretrain.ROLES))),
    "model_max_length": (77, lambda tokenizer: tokenizer.model_max_length == 77),
}


@pytest.mark.parametrize("key", sorted(SETTINGS))
def test_each_setting_reaches_the_trained_tokenizer(key):
    value, holds = SETTINGS[key]
    default = train_tokenizer(CORPUS, TokenizerSection(vocab_size=400))
    changed = train_tokenizer(CORPUS, TokenizerSection(**{"vocab_size": 400, key: value}))
    assert holds(changed) and not holds(default)


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


BAD_INPUT = {
    "missing": "data file not found",
    "empty": "no text found",
    "vocab": "smaller than the byte alphabet plus special tokens",
    "malformed": "bad.jsonl:3: malformed JSON",
    "no_text": "no text found",
    "unknown_key": "unknown key 'tokenizer.vocab'",
    "bad_type": "tokenizer.vocab_size must be int",
}


def bad_input_arguments(folder: Path, case: str) -> list[str]:
    """Arguments that make the script fail with BAD_INPUT[case], writing into folder/tok (which already exists)."""
    good = write_jsonl(folder / "good.jsonl", [{"text": text} for text in CORPUS[:8]])
    args = {"train": str(good), "vocab": "300"}
    extra = []
    if case == "missing":
        args["train"] = str(folder / "absent.jsonl")
    elif case == "empty":
        (folder / "empty.jsonl").write_text("")
        args["train"] = str(folder / "empty.jsonl")
    elif case == "vocab":
        args["vocab"] = "200"
    elif case == "malformed":
        bad = folder / "bad.jsonl"
        bad.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": "broken\n')
        args["train"] = str(bad)
    elif case == "no_text":
        args["train"] = str(write_jsonl(folder / "other.jsonl", [{"title": "no text field"}]))
    elif case == "unknown_key":
        extra = ["--tokenizer.vocab", "300"]
    elif case == "bad_type":
        args["vocab"] = "lots"
    return ["--data.train_files", args["train"], "--data.val_files", "[]", "--tokenizer.vocab_size", args["vocab"],
            "--tokenizer.out_dir", str(folder / "tok"), "--eval.report", str(folder / "report.json"), *extra]


def run_in_process(arguments: list[str]) -> tuple[int, str]:
    """tokenizer_pretrain.main as the command line runs it: (exit code, stderr)."""
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr):
        patch.chdir(ROOT)  # the default config path is relative to the repository
        patch.setattr(sys, "argv", ["tokenizer_pretrain.py", *arguments])
        try:
            tokenizer_pretrain.main()
            code = 0
        except SystemExit as stop:
            code = stop.code
    return code, stderr.getvalue()


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, tuple[int, str, Path, dict]]:
    """A training run as a real process (it proves the command line), and every bad input through the same main() in
    this process while that one imports: name -> (exit code, stderr, its folder, digest of its existing tokenizer
    folder before the run)."""
    root = tmp_path_factory.mktemp("cli")
    train = write_jsonl(root / "train.jsonl", [{"text": text} for text in CORPUS])
    conversations = write_jsonl(root / "sft.jsonl", [{"conversations": [
        {"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hello!"}]}] * 10)
    val = write_jsonl(root / "val.jsonl", [{"text": "今天我们学习。"}, {"text": "Hello tokenizer."}])
    (root / "trains").mkdir()
    arguments = ["--data.train_files", f"[{train}, {conversations}]", "--data.val_files", str(val),
                 "--tokenizer.vocab_size", "350", "--tokenizer.out_dir", str(root / "trains" / "tok"),
                 "--eval.report", str(root / "trains" / "report.json")]
    process = subprocess.Popen([sys.executable, str(ROOT / "tokenizer_pretrain.py"), *arguments], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        existing = train_tokenizer(CORPUS, TokenizerSection(vocab_size=300))
        results = {}
        for case in BAD_INPUT:
            folder = root / case
            save_atomically(existing, folder / "tok")
            before = folder_digest(folder / "tok")
            results[case] = (*run_in_process(bad_input_arguments(folder, case)), folder, before)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    results["trains"] = (process.returncode, stderr, root / "trains", {})
    return results


@pytest.mark.slow
def test_cli_trains_and_writes_report(cli_runs):
    code, stderr, folder, _ = cli_runs["trains"]
    assert code == 0, stderr
    report = json.loads((folder / "report.json").read_text())
    assert report["vocab_size"] == 350
    assert all(row["exact"] for row in report["round_trip"].values())
    assert report["held_out"]["chinese"]["documents"] == 1
    assert report["held_out"]["english_and_code"]["documents"] == 1
    assert 0 < report["vocabulary_use"]["fraction_used_on_train"] <= 1
    assert AutoTokenizer.from_pretrained(folder / "tok").eos_token == "<|SEOS|>"


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_without_touching_output(cli_runs, case):
    code, stderr, folder, before = cli_runs[case]
    assert code == 2
    assert "Traceback" not in stderr
    assert stderr.strip().count("\n") == 0 and BAD_INPUT[case] in stderr, stderr
    assert folder_digest(folder / "tok") == before
    assert not (folder / "report.json").exists()


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
