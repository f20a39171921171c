"""scripts/chat.py: one-shot answers stop at the end-of-sequence token; bad input exits 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import save_tiny_start, tiny_config
from model import ByteModel
from utils import inference

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import chat  # noqa: E402


class ScriptedModel(ByteModel):
    """Greedy decoding follows a fixed script of tokens, so the test knows exactly when EOS comes."""

    script: list[int] = []

    def forward(self, input_ids=None, **kwargs):
        output = super().forward(input_ids=input_ids, **kwargs)
        step = len(self.calls)
        self.calls.append(input_ids.shape[1])
        logits = torch.zeros_like(output.logits)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 10.0
        output.logits = logits
        return output


def scripted(tokenizer, script: list[int]) -> ScriptedModel:
    config = tiny_config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    language_model = ScriptedModel(config).eval()
    language_model.script, language_model.calls = script, []
    return language_model


def arguments(**overrides):
    values = dict(temperature=0.0, top_k=50, top_p=0.9, repetition_penalty=1.0, max_new_tokens=50, compile=False)
    values.update(overrides)
    return type("Args", (), values)()


def test_reply_streams_and_stops_at_eos(capsys):
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tokenizer")
    words = tokenizer.encode(" hello world", add_special_tokens=False)
    language_model = scripted(tokenizer, words + [tokenizer.eos_token_id] + words * 10)
    config = chat.generation_config(arguments(), tokenizer)
    text = chat.reply(language_model, tokenizer, [{"role": "user", "content": "hi"}], config)
    assert text == " hello world"
    # prefill + one call per generated token up to and including EOS, then nothing more
    assert len(language_model.calls) == len(words) + 1
    assert capsys.readouterr().out.strip() == "hello world"


def test_reply_respects_max_new_tokens_without_eos():
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tokenizer")
    words = tokenizer.encode(" again", add_special_tokens=False)
    language_model = scripted(tokenizer, words)
    config = chat.generation_config(arguments(max_new_tokens=5), tokenizer)
    text = chat.reply(language_model, tokenizer, [{"role": "user", "content": "hi"}], config)
    assert tokenizer.encode(text, add_special_tokens=False) == words * 5


@pytest.mark.slow
def test_prompt_mode_end_to_end_and_bad_input(tmp_path, monkeypatch, capsys):
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tokenizer")
    folder = tmp_path / "chat_model"
    ByteModel(tiny_config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # One real process proves the command line (and that nothing else reaches stderr); it imports while the input
    # errors below run here, through the same main().
    command = [sys.executable, str(ROOT / "scripts" / "chat.py"), "--model", str(folder), "--prompt", "你好",
               "--max-new-tokens", "7", "--temperature", "0"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    capsys.readouterr()  # the save's progress bars
    try:
        for bad in (["--model", str(tmp_path / "missing"), "--prompt", "x"],
                    ["--model", str(folder), "--prompt", "x", "--top-p", "0"]):
            monkeypatch.setattr(sys, "argv", ["chat.py", *bad])
            with pytest.raises(SystemExit) as exit_info:
                chat.main()
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and err.startswith("error:") and "Traceback" not in err, err
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert stderr == "" and "you>" not in stdout


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return save_tiny_start(tmp_path_factory.mktemp("chat") / "model")


def replied(monkeypatch, arguments: list[str]) -> dict:
    """chat.py's main with `arguments`, stopped at the reply it would generate: what it generates with."""
    seen = {}

    def reply(language_model, tokenizer, messages, config, draft=None):
        seen.update(model=language_model, messages=messages, config=config, draft=draft, seed=torch.initial_seed())
        return ""

    monkeypatch.setattr(chat, "reply", reply)
    monkeypatch.setattr(sys, "argv", ["chat.py", *arguments])
    chat.main()
    return seen


# An option -> its value, and what is true of the reply generated with it (and not of the one generated without).
OPTIONS = {
    "--model": ("{other}", lambda seen: seen["model"].lm_head.weight.abs().sum() == 0),
    "--prompt": ("What is 2 + 3?", lambda seen: seen["messages"][-1] == {"role": "user", "content": "What is 2 + 3?"}),
    "--system": ("Be brief.", lambda seen: seen["messages"][0] == {"role": "system", "content": "Be brief."}),
    "--temperature": ("0.3", lambda seen: seen["config"].temperature == 0.3),
    "--top-k": ("5", lambda seen: seen["config"].top_k == 5),
    "--top-p": ("0.5", lambda seen: seen["config"].top_p == 0.5),
    "--repetition-penalty": ("1.5", lambda seen: seen["config"].repetition_penalty == 1.5),
    "--max-new-tokens": ("7", lambda seen: seen["config"].max_new_tokens == 7),
    "--seed": ("1234", lambda seen: seen["seed"] == 1234),
    "--compile": (None, lambda seen: seen["config"].cache_implementation == "static"),
    "--quantize": ("int8", lambda seen: getattr(seen["model"].config, "quantization", None) == "int8"),
    "--attn-implementation": ("eager", lambda seen: seen["model"].config._attn_implementation == "eager"),
    "--precision": ("bf16", lambda seen: seen["model"].dtype == torch.bfloat16),
    "--draft": ("int4", lambda seen: getattr(getattr(seen["draft"], "config", None), "quantization", None) == "int4"),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_each_option_reaches_the_reply(option, model_folder, tmp_path, monkeypatch):
    value, holds = OPTIONS[option]
    monkeypatch.setattr(inference, "bf16_speedup", lambda *args: 1.0)  # the default, auto, picks fp32
    if option == "--model":
        other = AutoModelForCausalLM.from_pretrained(model_folder)
        with torch.no_grad():
            other.lm_head.weight.zero_()
        other.save_pretrained(tmp_path / "other")
        AutoTokenizer.from_pretrained(model_folder).save_pretrained(tmp_path / "other")
    base = ["--model", str(model_folder), "--prompt", "hi"]
    default = replied(monkeypatch, base)
    changed = replied(monkeypatch, base + [option] + ([value.format(other=tmp_path / "other")] if value else []))
    assert holds(changed) and not holds(default)
