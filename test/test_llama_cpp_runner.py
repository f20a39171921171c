"""utils/llama_cpp_runner.py: an exported file opened in llama.cpp decodes our greedy tokens in f32, and exactly as
many as asked, past the end-of-sequence token. (test_export_gguf.py checks logits and continuations of every kind
of export with it.)"""

import sys

import pytest
import torch

from helpers import ROOT, randomize_, run_script_main, tiny_config
from model import ByteModel
from utils.llama_cpp_runner import greedy, open_gguf

sys.path.insert(0, str(ROOT / "scripts"))
from export_gguf import main  # noqa: E402

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (its build needs a compiler)")


@pytest.mark.parametrize("eos_always", [False, True], ids=["random", "eos-always"])
def test_greedy_decodes_our_tokens_and_runs_past_end_of_sequence(tmp_path, tokenizer, eos_always):
    torch.manual_seed(0)
    language_model = randomize_(ByteModel(tiny_config(vocab_size=len(tokenizer), max_position_embeddings=64,
                                                      eos_token_id=tokenizer.eos_token_id))).eval()
    if eos_always:
        # Layers that add nothing, one embedding for every token and a head that scores only the end-of-sequence
        # token: its logit is the only non-zero one at every position.
        with torch.no_grad():
            for layer in language_model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            language_model.model.embed_tokens.weight.fill_(1.0)
            language_model.lm_head.weight.zero_()
            language_model.lm_head.weight[tokenizer.eos_token_id] = 1.0
    language_model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    code, _, err = run_script_main(main, ["--model", str(tmp_path / "model"), "--out", str(tmp_path / "f32.gguf")])
    assert code == 0, err
    prompt = tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"]
    ours = language_model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    llm = open_gguf(tmp_path / "f32.gguf", context=64, threads=1)
    try:
        assert greedy(llm, prompt, 12) == ours
        assert greedy(llm, prompt, 5) == ours[:5]  # a second call starts again from the prompt
    finally:
        llm.close()
    assert (set(ours) == {tokenizer.eos_token_id}) == eos_always
