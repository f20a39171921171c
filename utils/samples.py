"""Text a model writes from a fixed prompt, so that a person can read what a run has learned."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


@torch.no_grad()
def generate_sample(folder: Path, prompt: str, max_new_tokens: int, seed: int, chat: bool = False) -> str:
    """Sampled continuation of `prompt` by the model folder; with `chat` (and a chat template) the prompt is a user
    turn and only the reply is returned."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat = chat and tokenizer.chat_template is not None
    if chat:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
    else:
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(seed)
    output = model.generate(**inputs, do_sample=True, max_new_tokens=max_new_tokens)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:] if chat else output[0], skip_special_tokens=True)
