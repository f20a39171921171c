"""Text a model writes from fixed prompts, so that a person can read what a run has learned: greedy (the same
model always writes the same text, so two evaluations differ only by what was learned between them), with an
optional repetition penalty: an early model's most likely continuation is its last few tokens over and over,
which hides the words it already knows."""

import torch
from torch import nn


@torch.no_grad()
def greedy_samples(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int,
                   chat: bool = False, repetition_penalty: float = 1.0) -> list[str]:
    """Greedy continuation of each prompt; with `chat` (and a chat template) each prompt is a user turn and the
    sample is the reply. `repetition_penalty` is CTRL's (transformers' `repetition_penalty`). The model is left in
    the mode it was in."""
    chat = chat and tokenizer.chat_template is not None
    training = model.training
    model.eval()
    try:
        samples = []
        for prompt in prompts:
            if chat:
                inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                       add_generation_prompt=True, return_tensors="pt",
                                                       return_dict=True)
            else:
                inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            inputs = {key: value.to(model.device) for key, value in inputs.items()}
            output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                    repetition_penalty=repetition_penalty,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            new_tokens = output[0, inputs["input_ids"].shape[1]:]
            samples.append(tokenizer.decode(new_tokens, skip_special_tokens=True))
        return samples
    finally:
        model.train(training)
