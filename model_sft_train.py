"""Supervised fine-tuning: `torchrun --standalone --nproc_per_node=N model_sft_train.py --config FILE`.

Starts from a causal LM folder (`model.init_from`: this project's pretraining `final/`, or a transformers Llama or
Mixtral folder) and trains on chat conversations with loss on the assistant replies only. Same engine, CLI,
checkpoints, resume and logging as `model_pretrain.py`; with `lora.enabled` only low-rank adapters are trained. At
the end the final model answers `eval.generation_samples` validation conversations, scored with BLEU, ROUGE and
METEOR.
"""

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from utils.config import SFTConfig
from utils.data import DataIssues, PadCollator, SFTDataset, conversation_turns, read_records
from utils.files import write_atomically
from utils.logger import get_logger
from utils.metrics import generation_metrics
from utils.task import Task
from utils.trainer import run_training


def sft_datasets(tokenizer, config: SFTConfig, log):
    data = config.data
    train = SFTDataset(data.train_files, tokenizer, data.seq_len, data.strict, log)
    val = SFTDataset(data.val_files, tokenizer, data.seq_len, data.strict, log) if data.val_files else None
    return train, val


def prompts_and_references(files: list[str], limit: int) -> list[tuple[list[dict], str]]:
    """Each usable conversation up to its last assistant turn (the prompt), and that turn (the reference)."""
    pairs = []
    for _, record in read_records(files, DataIssues()):
        turns, _, _ = conversation_turns(record)
        if turns is None:
            continue
        last = max(index for index, turn in enumerate(turns) if turn["role"] == "assistant")
        pairs.append((turns[:last], turns[last]["content"]))
        if len(pairs) == limit:
            return pairs
    return pairs


@torch.no_grad()
def evaluate_generation(folder: Path, files: list[str], samples: int, max_new_tokens: int) -> dict:
    """Greedy replies of the model in `folder` to validation prompts, scored against the reference replies."""
    language_model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    predictions, references = [], []
    for prompt, reference in prompts_and_references(files, samples):
        inputs = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        output = language_model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        predictions.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        references.append(reference)
    report = generation_metrics(predictions, references)
    report["examples"] = [{"prediction": p, "reference": r} for p, r in list(zip(predictions, references))[:5]]
    return report


def generation_row(final: Path, config: SFTConfig) -> dict:
    """The final model's replies to validation conversations: generation_eval.json, and the scores for metrics."""
    samples = config.eval.generation_samples
    if samples <= 0 or not config.data.val_files:
        return {}
    report = evaluate_generation(final, config.data.val_files, samples, config.eval.generation_tokens)
    write_atomically(final.parent / "generation_eval.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    meteor = f"{report['meteor']:.4f}" if report["meteor"] is not None else f"unavailable ({report['meteor_note']})"
    get_logger().info(f"generation on {report['num_samples']} validation conversations: BLEU {report['bleu']:.4f}, "
                      f"ROUGE-1/2/L {report['rouge1']:.4f}/{report['rouge2']:.4f}/{report['rougeL']:.4f}, "
                      f"METEOR {meteor}")
    return {key: report[key] for key in ("bleu", "rouge1", "rouge2", "rougeL", "meteor", "num_samples")}


SFT = Task(datasets=sft_datasets, collator=lambda tokenizer: PadCollator(tokenizer.pad_token_id), chat_sample=True,
           evaluate_final=generation_row, config_type=SFTConfig)

if __name__ == "__main__":
    run_training(SFT, "configs/model_sft.yaml", __doc__.splitlines()[0])
