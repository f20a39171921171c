"""Data pipeline speed on the demo config, against the training step it feeds, in one run.

Prints the time to tokenize the demo corpus into the token cache (fresh, in a temporary folder), the loader's
tokens/s for pretraining windows and for SFT batches, the demo model's training tokens/s (forward, backward and
AdamW step), and the ratio loader / training, which should stay far above 1 (target: 50x) so that data loading is
never what a run waits for. Ends with one JSON line. Run it alone on the machine.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from model import ByteModel
from utils.config import TrainingConfig, model_config_from, parse_config
from utils.data import PadCollator, PretrainDataset, ResumableSampler, SFTDataset, build_token_cache


def loader_tokens_per_s(loader: DataLoader, max_batches: int) -> float:
    tokens, start = 0, time.perf_counter()
    for index, batch in enumerate(loader):
        tokens += batch["input_ids"].numel()
        if index + 1 == max_batches:
            break
    return tokens / (time.perf_counter() - start)


def training_tokens_per_s(config: TrainingConfig, tokenizer, batch: dict, steps: int) -> float:
    model = ByteModel(model_config_from(config.model, tokenizer)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for step in range(steps + 1):
        if step == 1:  # the first step warms up the allocator and optimizer state
            start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * batch["input_ids"].numel() / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/model_pretrain.yaml")
    parser.add_argument("--batches", type=int, default=300, help="batches to time each loader over")
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--output", default="model_info/bench_data.json")
    args = parser.parse_args()
    config, _ = parse_config(TrainingConfig, args.config, "bench", argv=["--config", args.config])
    tokenizer = AutoTokenizer.from_pretrained(config.data.tokenizer)

    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        _, meta = build_token_cache(config.data.train_files, tokenizer, cache_dir)
        tokenize_seconds = time.perf_counter() - start
        start = time.perf_counter()
        build_token_cache(config.data.train_files, tokenizer, cache_dir)
        reuse_seconds = time.perf_counter() - start
        dataset = PretrainDataset(config.data.train_files, tokenizer, config.data.seq_len, cache_dir)
        micro = config.train.micro_batch_size
        loader = DataLoader(dataset, batch_size=micro, sampler=ResumableSampler(len(dataset), seed=0),
                            drop_last=True)
        # Cycle the (small) demo set so the timing covers enough batches.
        pretrain_rate = loader_tokens_per_s(_cycle(loader), args.batches)
        batch = next(iter(loader))

    sft = SFTDataset(["datasets/demo/sft_train.jsonl"], tokenizer, config.data.seq_len)
    sft_loader = DataLoader(sft, batch_size=micro, collate_fn=PadCollator(tokenizer.pad_token_id),
                            sampler=ResumableSampler(len(sft), seed=0, lengths=sft.lengths, group_size=64 * micro))
    sft_rate = loader_tokens_per_s(_cycle(sft_loader), args.batches)
    train_rate = training_tokens_per_s(config, tokenizer, batch, args.train_steps)

    result = {"corpus_tokens": meta["num_tokens"], "corpus_documents": meta["num_documents"],
              "tokenize_seconds": tokenize_seconds, "cache_reuse_seconds": reuse_seconds,
              "pretrain_loader_tokens_per_s": pretrain_rate, "sft_loader_tokens_per_s": sft_rate,
              "train_tokens_per_s": train_rate, "pretrain_loader_over_training": pretrain_rate / train_rate,
              "sft_loader_over_training": sft_rate / train_rate}
    print(f"tokenize demo corpus: {meta['num_documents']} documents, {meta['num_tokens']} tokens in "
          f"{tokenize_seconds:.2f}s (cache reuse {reuse_seconds * 1000:.1f} ms)")
    print(f"pretrain loader {pretrain_rate:,.0f} tok/s   SFT loader {sft_rate:,.0f} tok/s   "
          f"training {train_rate:,.0f} tok/s")
    print(f"loader / training: pretrain {result['pretrain_loader_over_training']:.0f}x, "
          f"SFT {result['sft_loader_over_training']:.0f}x (target >= 50x)")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def _cycle(loader: DataLoader):
    while True:
        yield from loader


if __name__ == "__main__":
    main()
