"""utils/data.py SFTDataset, encode_conversation and PadCollator: assistant-only labels, padded batches."""

import json
import re

import pytest
import torch

from helpers import ATOL, BOS, DEMO, EOS, MULTI_TURNS, PAD, TWO_TURNS, tiny_config, write_lines
from model import ByteModel
from utils.data import PadCollator, SFTDataset, encode_conversation
from utils.errors import InputError


def labelled_runs(ids: list[int], labels: list[int]) -> list[tuple[int, int]]:
    """(start, stop) of each maximal run of labelled positions."""
    runs, start = [], None
    for position, label in enumerate(labels + [-100]):
        if label != -100 and start is None:
            start = position
        elif label == -100 and start is not None:
            runs.append((start, position))
            start = None
    return runs


def rendered(tokenizer, turns, **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(turns, tokenize=True, **kwargs)["input_ids"]


def check_assistant_only_labels(tokenizer, turns, ids, labels, num_replies=None):
    assert len(ids) == len(labels)
    assert all(label == -100 or label == token for token, label in zip(ids, labels))
    replies = [turn["content"] for turn in turns if turn["role"] == "assistant"][:num_replies]
    runs = labelled_runs(ids, labels)
    assert [tokenizer.decode(ids[a:b], skip_special_tokens=False) for a, b in runs] == \
        [reply + "<|SEOS|>" for reply in replies]
    for start, stop in runs:
        assert ids[stop - 1] == EOS  # the end token is trained ...
        if stop < len(ids):  # ... the template's "\n" after it is not
            assert tokenizer.decode(ids[stop:stop + 1]) == "\n" and labels[stop] == -100
        # the prompt before the reply is not; the reply follows the role marker directly
        assert tokenizer.decode(ids[start - 1:start], skip_special_tokens=False) == "<|assistant|>"
    return runs


@pytest.mark.parametrize("turns", [TWO_TURNS, MULTI_TURNS], ids=["two_turns", "multi_turn"])
def test_encode_conversation_labels_exactly_the_assistant_replies(tokenizer, turns):
    ids, labels = encode_conversation(tokenizer, turns, max_seq_len=1024)
    assert ids == rendered(tokenizer, turns) and ids[0] == BOS
    assert tokenizer.decode(ids, skip_special_tokens=False).startswith("<|SBOS|>")
    runs = check_assistant_only_labels(tokenizer, turns, ids, labels)
    assert len(runs) == sum(turn["role"] == "assistant" for turn in turns)
    assert sum(label != -100 for label in labels) == sum(b - a for a, b in runs)



def test_encode_conversation_labels_a_reply_starting_with_indentation(tokenizer):
    turns = [{"role": "user", "content": "Finish the function body."},
             {"role": "assistant", "content": "    return a + b"}]
    ids, labels = encode_conversation(tokenizer, turns, max_seq_len=1024)
    check_assistant_only_labels(tokenizer, turns, ids, labels)


def test_sft_conversation_opening_with_the_assistant(tmp_path, tokenizer):
    opening = [{"role": "assistant", "content": "Hello, how can I help?"}, {"role": "user", "content": "Thanks."},
               {"role": "assistant", "content": "You are welcome."}]
    path = write_lines(tmp_path / "sft.jsonl", [{"conversations": TWO_TURNS}, {"conversations": opening}])
    dataset = SFTDataset([str(path)], tokenizer, max_seq_len=1024)
    if len(dataset) == 2:  # trained on: labels are exactly the replies
        check_assistant_only_labels(tokenizer, opening, dataset[1]["input_ids"].tolist(), dataset[1]["labels"].tolist())
    else:  # or skipped as a bad record, with its location
        assert dataset.issues.total == 1 and f"{path}:2" in dataset.issues.summary()

def test_sft_dataset_messages_key_works_like_conversations(tmp_path, tokenizer):
    path = write_lines(tmp_path / "sft.jsonl", [{"conversations": MULTI_TURNS}, {"messages": MULTI_TURNS},
                                                {"messages": TWO_TURNS, "id": 3}])
    logged = []
    dataset = SFTDataset([str(path)], tokenizer, max_seq_len=1024, log=logged.append)
    assert len(dataset) == 3 and dataset.issues.total == 0 and logged == []
    assert torch.equal(dataset[0]["input_ids"], dataset[1]["input_ids"])
    assert torch.equal(dataset[0]["labels"], dataset[1]["labels"])
    ids, labels = encode_conversation(tokenizer, TWO_TURNS, 1024)
    assert dataset[2]["input_ids"].tolist() == ids and dataset[2]["labels"].tolist() == labels
    assert dataset[2]["input_ids"].dtype == dataset[2]["labels"].dtype == torch.long
    assert dataset.lengths == [len(dataset[i]["input_ids"]) for i in range(3)]


def test_sft_dataset_on_demo_data(tmp_path, tokenizer):
    lines = (DEMO / "sft_val.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    path = write_lines(tmp_path / "demo.jsonl", lines)
    dataset = SFTDataset([str(path)], tokenizer, max_seq_len=4096)
    assert len(dataset) == 8 and dataset.issues.total == 0
    for line, index in zip(lines, range(8)):
        turns = json.loads(line).get("conversations") or json.loads(line)["messages"]
        sample = dataset[index]
        check_assistant_only_labels(tokenizer, turns, sample["input_ids"].tolist(), sample["labels"].tolist())


def test_encode_conversation_truncates_at_turn_boundaries(tokenizer, tmp_path):
    full = rendered(tokenizer, MULTI_TURNS)
    first_start = len(rendered(tokenizer, MULTI_TURNS[:2], add_generation_prompt=True))
    first_end = len(rendered(tokenizer, MULTI_TURNS[:3]))
    assert first_start < first_end < len(full)

    # Room for the first exchange but not the second: whole turns are kept, ending at the first reply.
    for max_seq_len in (first_end, first_end + 1, (first_end + len(full)) // 2, len(full) - 1):
        ids, labels = encode_conversation(tokenizer, MULTI_TURNS, max_seq_len)
        assert ids == full[:first_end] and ids[-2] == EOS
        assert tokenizer.decode(ids[-2:], skip_special_tokens=False) == "<|SEOS|>\n"
        check_assistant_only_labels(tokenizer, MULTI_TURNS, ids, labels, num_replies=1)
    assert encode_conversation(tokenizer, MULTI_TURNS, len(full))[0] == full

    # Not even the first reply fits: cut at max_seq_len, keeping the reply's beginning as labels.
    for max_seq_len in (first_start + 1, first_start + 4, first_end - 1):
        ids, labels = encode_conversation(tokenizer, MULTI_TURNS, max_seq_len)
        assert ids == full[:max_seq_len] and len(ids) == max_seq_len
        assert [i for i, label in enumerate(labels) if label != -100] == list(range(first_start, max_seq_len))
        assert labels[first_start:] == full[first_start:max_seq_len]

    # No assistant token fits: nothing to learn.
    assert encode_conversation(tokenizer, MULTI_TURNS, first_start) is None
    assert encode_conversation(tokenizer, MULTI_TURNS, 3) is None

    path = write_lines(tmp_path / "sft.jsonl", [{"conversations": TWO_TURNS}, {"conversations": MULTI_TURNS}])
    dataset = SFTDataset([str(path)], tokenizer, max_seq_len=first_start)
    assert len(dataset) == 1 and dataset.issues.counts == {"too_long": 1}
    assert dataset.issues.examples == {"too_long": [f"{path}:2"]}
    with pytest.raises(InputError, match=re.escape(f"{path}:2: no assistant token fits in max_seq_len={first_start}")):
        SFTDataset([str(path)], tokenizer, max_seq_len=first_start, strict=True)



# ---------------------------------------------------------------------------------------------------------------
# PadCollator
# ---------------------------------------------------------------------------------------------------------------

def test_pad_collator_pads_to_the_longest_in_the_batch():
    samples = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
               {"input_ids": torch.tensor([8, 9, 10, 11, 12]), "labels": torch.tensor([-100, -100, 10, 11, 12])},
               {"input_ids": torch.tensor([13]), "labels": torch.tensor([13])}]
    batch = PadCollator(pad_token_id=PAD)(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12], [13, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 10, 11, 12],
                                        [13, -100, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert PadCollator(pad_token_id=99)(samples[:1])["input_ids"].tolist() == [[5, 6, 7]]


def test_collated_sft_batch_gives_each_row_its_own_logits(tmp_path, tokenizer):
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    conversations = [TWO_TURNS, MULTI_TURNS, short]
    path = write_lines(tmp_path / "sft.jsonl", [{"conversations": turns} for turns in conversations])
    dataset = SFTDataset([str(path)], tokenizer, max_seq_len=512)
    samples = [dataset[i] for i in range(len(dataset))]
    lengths = [len(sample["input_ids"]) for sample in samples]
    assert len(set(lengths)) == 3
    batch = PadCollator(tokenizer.pad_token_id)(samples)
    assert batch["input_ids"].shape == (3, max(lengths)) and max(lengths) < 512  # the batch's longest, not max_seq_len
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (max(lengths) - length)
        assert (batch["input_ids"][row, length:] == PAD).all() and (batch["labels"][row, length:] == -100).all()
        assert torch.equal(batch["input_ids"][row, :length], samples[row]["input_ids"])
        assert torch.equal(batch["labels"][row, :length], samples[row]["labels"])

    torch.manual_seed(0)
    model = ByteModel(tiny_config(vocab_size=6400, max_position_embeddings=128)).eval()
    with torch.no_grad():
        batched = model(**batch)
        total = 0.0
        for row, sample in enumerate(samples):
            alone = model(input_ids=sample["input_ids"][None], labels=sample["labels"][None], num_items_in_batch=1)
            length = lengths[row]
            # the positions whose logits the loss uses
            trained = (shifted_labels(sample["labels"]) != -100).nonzero().flatten()
            assert len(trained) > 0
            torch.testing.assert_close(batched.logits[row, trained], alone.logits[0, trained], atol=ATOL, rtol=0)
            torch.testing.assert_close(batched.logits[row, :length], alone.logits[0], atol=ATOL, rtol=0)
            total += alone.loss.item()
    num_labels = sum(int((shifted_labels(s["labels"]) != -100).sum()) for s in samples)
    assert batched.loss.item() == pytest.approx(total / num_labels, rel=1e-5)


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets per position: the label of the next token (-100 at the end)."""
    return torch.cat([labels[1:], torch.tensor([-100])])
