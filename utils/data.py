"""Data for every stage: packed token windows (cached or streamed) for pretraining, chat-formatted conversations for
SFT, preference pairs for the preference stage, and a sampler whose order depends only on (seed, epoch) and that
resumes on exactly the next batch."""

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from utils.errors import InputError
from utils.files import open_atomically, write_atomically
from utils.sources import Malformed, Source, data_sources

ROLES = ("system", "user", "assistant")
CACHE_FORMAT = 1  # bump when the token cache layout changes, so old caches are rebuilt
TOKENIZE_BATCH = 512  # documents per batch call: the fast tokenizer spreads a batch over all cores


@dataclass
class DataIssues:
    """Counts bad records per reason and keeps the first few file:line locations. In strict mode the first bad
    record raises InputError instead."""

    strict: bool = False
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3
    first: str | None = None  # "file:line: detail" of the first bad record

    def report(self, reason: str, location: str, detail: str) -> None:
        if self.strict:
            raise InputError(f"{location}: {detail} (set data.strict=false to skip such lines)")
        self.first = self.first or f"{location}: {detail}"
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(location)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no bad records"
        parts = [f"{reason} {count} (first: {', '.join(self.examples[reason])})"
                 for reason, count in sorted(self.counts.items())]
        return f"skipped {self.total} bad records: " + "; ".join(parts)


def read_records(entries: list[str], issues: DataIssues | None = None) -> Iterator[tuple[str, Any]]:
    """(location, record) for every record of the sources that `entries` name (see utils/sources.py). A malformed
    JSONL line raises InputError naming the file and line, or, given `issues`, is reported there and skipped."""
    for source in data_sources(entries):
        for _, location, record in source.records():
            if isinstance(record, Malformed):
                if issues is None:
                    raise InputError(f"{location}: {record.detail}")
                issues.report("malformed_json", location, record.detail)
                continue
            yield location, record


def parsed_records(files: list[str], issues: DataIssues,
                   parse: Callable[[Any], tuple[Any, str, str]]) -> Iterator[tuple[str, Any]]:
    """(location, parsed) for every record of `files` that `parse` accepts (it returns (parsed, "", "") or
    (None, reason, detail)); the others are reported to `issues`."""
    for location, record in read_records(files, issues):
        parsed, reason, detail = parse(record)
        if parsed is None:
            issues.report(reason, location, detail)
            continue
        yield location, parsed


def document_texts(record: Any) -> list[str]:
    """The texts of one data record: `{"text": ...}` for pretraining, or the turn contents of
    `{"conversations"|"messages": [{"role", "content"}, ...]}`."""
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            return [record["text"]]
        turns = record.get("conversations", record.get("messages"))
        if isinstance(turns, list):
            return [turn["content"] for turn in turns if isinstance(turn, dict) and isinstance(turn.get("content"), str)]
    return []


def iter_pretrain_documents(sources: list[Source], issues: DataIssues, text_field: str = "text",
                            start: int = 0) -> Iterator[tuple[int, str]]:
    """Yield (document index, text) over all sources in order, from document `start` on (sources and Parquet row
    groups before it are skipped unread). The index counts every record, good or bad, so it names the same document
    whatever is skipped, which streaming shards and resume positions rely on. A record's text is its `text_field`;
    plain-text files hold one document per line."""
    index = 0
    for source in sources:
        rows = None
        for row, location, record in source.records(skip=max(start - index, 0), columns=[text_field]):
            rows = row + 1
            if isinstance(record, Malformed):
                issues.report("malformed_json", location, record.detail)
            elif not isinstance(record, dict) or text_field not in record:
                issues.report("missing_text", location, f"no {text_field!r} field")
            elif not isinstance(record[text_field], str):
                issues.report("missing_text", location, f"{text_field!r} is not a string")
            elif not record[text_field].strip():
                issues.report("empty_text", location, "empty text")
            else:
                yield index + row, record[text_field]
        index += rows if rows is not None else source.count()


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the tokenizer would produce different ids: its whole serialised form plus the EOS id."""
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8"))
    digest.update(str(tokenizer.eos_token_id).encode())
    return digest.hexdigest()[:16]


def encode_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text followed by EOS, so packed documents stay separated."""
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no eos token, which packing needs between documents")
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [ids + [tokenizer.eos_token_id] for ids in encoded]


def build_token_cache(files: list[str], tokenizer, cache_dir: str | Path, strict: bool = False,
                      log=None, text_field: str = "text") -> tuple[Path, dict]:
    """Tokenize the sources `files` names once into a flat token file (uint16 when the vocabulary fits, else uint32)
    plus a metadata JSON; reuse it while the sources (each file's size and mtime, a database's table or query), the
    text field and the tokenizer are unchanged. Returns (token file, metadata).

    Written to temporary names and renamed, metadata last: a cache is either complete or absent. In distributed
    runs call it on one rank first, then on the others (which then only read)."""
    sources = data_sources(files)
    facts = [source.identity() for source in sources]
    key_source = json.dumps({"format": CACHE_FORMAT, "files": facts, "text_field": text_field,
                             "tokenizer": tokenizer_fingerprint(tokenizer)}, sort_keys=True)
    key = hashlib.sha256(key_source.encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    tokens_path, meta_path = cache_dir / f"pretrain-{key}.bin", cache_dir / f"pretrain-{key}.json"
    if meta_path.is_file() and tokens_path.is_file():
        meta = json.loads(meta_path.read_text())
        if tokens_path.stat().st_size == meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize:
            # The cache was built leniently; strict mode must still fail on the records it skipped.
            issues = DataIssues(counts=Counter(meta["skipped"]), examples=meta["skipped_examples"])
            if strict and issues.total:
                raise InputError(f"{meta['first_issue']} (set data.strict=false to skip such lines)")
            if log is not None and issues.total:
                log(issues.summary())
            return tokens_path, meta

    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    cache_dir.mkdir(parents=True, exist_ok=True)
    issues = DataIssues(strict=strict)
    num_tokens = num_documents = 0
    with open_atomically(tokens_path) as handle:
        batch: list[str] = []
        for _, text in iter_pretrain_documents(sources, issues, text_field):
            batch.append(text)
            if len(batch) == TOKENIZE_BATCH:
                num_tokens += _write_tokens(handle, encode_documents(tokenizer, batch), dtype)
                num_documents += len(batch)
                batch = []
        if batch:
            num_tokens += _write_tokens(handle, encode_documents(tokenizer, batch), dtype)
            num_documents += len(batch)
        if num_documents == 0:
            raise InputError(f"no usable documents in {', '.join(files)} ({issues.summary()})")
    meta = {"format": CACHE_FORMAT, "files": facts, "text_field": text_field,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "dtype": np.dtype(dtype).name, "num_tokens": num_tokens, "num_documents": num_documents,
            "skipped": dict(issues.counts), "skipped_examples": issues.examples, "first_issue": issues.first}
    write_atomically(meta_path, json.dumps(meta, indent=2))
    if log is not None and issues.total:
        log(issues.summary())
    return tokens_path, meta


def _write_tokens(handle, documents: list[list[int]], dtype) -> int:
    flat = np.fromiter((token for ids in documents for token in ids), dtype=dtype)
    flat.tofile(handle)
    return flat.size


class PretrainDataset(Dataset):
    """Fixed windows of `seq_len + 1` tokens over the packed token stream, consecutive windows sharing one token,
    so that every token is a target exactly once and no padding is ever trained on."""

    def __init__(self, files: list[str], tokenizer, seq_len: int, cache_dir: str | Path = ".cache/data",
                 strict: bool = False, log=None, text_field: str = "text"):
        if seq_len < 1:
            raise InputError(f"data.seq_len must be >= 1, got {seq_len}")
        tokens_path, self.meta = build_token_cache(files, tokenizer, cache_dir, strict, log, text_field)
        self.tokens = np.memmap(tokens_path, dtype=self.meta["dtype"], mode="r")
        self.seq_len = seq_len
        self.num_windows = (len(self.tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise InputError(f"{', '.join(files)}: {len(self.tokens)} tokens do not fill one window of "
                             f"seq_len + 1 = {seq_len + 1}")

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = index * self.seq_len
        window = torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))
        return {"input_ids": window[:-1], "shift_labels": window[1:]}


class ResumableSampler(Sampler[int]):
    """Distributed sampler whose order depends only on (seed, epoch) and that can start mid-epoch.

    Each epoch's permutation is cut to a multiple of `world_size`, and rank r takes positions r, r + world_size, ...
    so ranks see disjoint shares of equal length. With `lengths`, the permutation is cut into mega-batches that are
    sorted by length, so a batch holds samples of similar length and pads little (still random across batches).
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 lengths: list[int] | None = None, group_size: int | None = None):
        if num_samples < world_size:
            raise InputError(f"{num_samples} samples cannot be shared by {world_size} ranks")
        self.total = num_samples
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.lengths = lengths
        self.group_size = group_size
        self.epoch = 0
        self.start = 0
        self.per_rank = num_samples // world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch`, skipping the first `start` samples of this rank's share."""
        self.epoch, self.start = epoch, start

    def epoch_indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.total, generator=generator).tolist()
        else:
            order = list(range(self.total))
        if self.lengths is not None and self.group_size:
            groups = [order[i:i + self.group_size] for i in range(0, len(order), self.group_size)]
            order = [index for group in groups for index in sorted(group, key=lambda i: -self.lengths[i])]
        order = order[:self.per_rank * self.world_size]
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start

    def state_dict(self, consumed: int) -> dict[str, int]:
        """The position after `consumed` samples of the current epoch (on this rank)."""
        return {"epoch": self.epoch, "consumed": self.start + consumed, "num_samples": self.total,
                "world_size": self.world_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("num_samples", "world_size", "seed"):
            if state[key] != getattr(self, "total" if key == "num_samples" else key):
                raise InputError(f"the saved data position was made with {key}={state[key]}, this run has "
                                 f"{getattr(self, 'total' if key == 'num_samples' else key)}")
        self.set_epoch(state["epoch"], state["consumed"])


class StreamingPretrainDataset(IterableDataset):
    """Packed windows read lazily from sources too big to pre-tokenize.

    Documents are dealt round-robin to `world_size x num_workers` shards (one per rank and DataLoader worker), so
    no document is tokenized twice. Every sample carries its shard and the (document, token offset) where the shard's
    next window starts; passing the last of these per shard as `positions` resumes each shard there.
    """

    def __init__(self, files: list[str], tokenizer, seq_len: int, rank: int = 0, world_size: int = 1,
                 strict: bool = False, positions: dict[int, tuple[int, int]] | None = None, text_field: str = "text"):
        self.sources, self.text_field = data_sources(files), text_field
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.rank, self.world_size, self.strict = rank, world_size, strict
        self.positions = dict(positions or {})

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        shard = self.rank * num_workers + worker_id
        num_shards = self.world_size * num_workers
        start_document, start_offset = self.positions.get(shard, (0, 0))
        window = self.seq_len + 1
        tokens: list[int] = []
        # (document index, offset of the segment's first token in that document, segment length) per buffered part
        segments: list[list[int]] = []
        documents = ((index, text) for index, text in iter_pretrain_documents(
            self.sources, DataIssues(self.strict), self.text_field, start_document) if index % num_shards == shard)
        for batch in _batched(documents, TOKENIZE_BATCH // num_shards or 1):
            for (index, _), ids in zip(batch, encode_documents(self.tokenizer, [text for _, text in batch])):
                offset = start_offset if index == start_document else 0
                segments.append([index, offset, len(ids) - offset])
                tokens.extend(ids[offset:])
                while len(tokens) >= window:
                    sample = torch.tensor(tokens[:window], dtype=torch.long)
                    del tokens[:self.seq_len]
                    _advance(segments, self.seq_len)
                    yield {"input_ids": sample[:-1], "shift_labels": sample[1:], "shard": shard,
                           "document": segments[0][0], "offset": segments[0][1]}


def _batched(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _advance(segments: list[list[int]], count: int) -> None:
    """Drop `count` tokens from the front of the buffered segments."""
    while count:
        document, offset, length = segments[0]
        if length <= count:
            segments.pop(0)
            count -= length
        else:
            segments[0] = [document, offset + count, length - count]
            count = 0


def render_chat(tokenizer, turns: list[dict], add_generation_prompt: bool = False) -> list[int]:
    return tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=add_generation_prompt)["input_ids"]


def reply_span(tokenizer, turns: list[dict], index: int, full: list[int]) -> tuple[int, int, int]:
    """Where the assistant turn `turns[index]` sits in `full` (the whole rendered conversation): (start, stop, end).
    Trained tokens are start:stop, the reply up to and including its end token; the template's separator after it
    (stop:end) stays unlabelled."""
    start = len(render_chat(tokenizer, turns[:index], add_generation_prompt=True))
    end = len(render_chat(tokenizer, turns[:index + 1]))
    reply = full[start:end]
    eos_positions = [i for i, token in enumerate(reply) if token == tokenizer.eos_token_id]
    return start, start + (eos_positions[-1] + 1 if eos_positions else len(reply)), end


def encode_conversation(tokenizer, turns: list[dict], max_seq_len: int) -> tuple[list[int], list[int]] | None:
    """Render `turns` with the tokenizer's chat template; labels are -100 except on assistant replies and their end
    token. Too long: whole trailing turns are dropped first; if even the first reply does not fit, it is cut.
    Returns None when no labelled token is left."""
    full = render_chat(tokenizer, turns)
    labels = [-100] * len(full)
    ends = []  # where each assistant turn ends, for truncation at turn boundaries
    for index, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        start, stop, end = reply_span(tokenizer, turns, index, full)
        labels[start:stop] = full[start:stop]
        ends.append(end)
    if len(full) > max_seq_len:
        fitting = [end for end in ends if end <= max_seq_len]
        cut = fitting[-1] if fitting else max_seq_len
        full, labels = full[:cut], labels[:cut]
    if all(label == -100 for label in labels):
        return None
    return full, labels


def conversation_turns(record: Any) -> tuple[list[dict] | None, str, str]:
    """Validate an SFT record; return (turns, "", "") or (None, reason, detail)."""
    if not isinstance(record, dict):
        return None, "missing_field", "record is not an object"
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list) or not turns:
        return None, "missing_field", "no 'conversations' or 'messages' list"
    problem = turn_problem(turns)
    if problem:
        return None, *problem
    if not any(turn["role"] == "assistant" for turn in turns):
        return None, "no_assistant", "no assistant turn to learn from"
    if not opens_with_user(turns):
        return None, "bad_order", "the conversation must open with a user turn (after an optional system turn)"
    return [{"role": turn["role"], "content": turn["content"]} for turn in turns], "", ""


def turn_problem(turns: list) -> tuple[str, str] | None:
    """(reason, detail) for the first malformed turn: not a {role, content} object, an unknown role, no text."""
    for turn in turns:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            return "missing_field", "a turn lacks 'role' or 'content'"
        if turn["role"] not in ROLES:
            return "bad_role", f"role {turn['role']!r} is not one of {', '.join(ROLES)}"
        if not isinstance(turn["content"], str) or not turn["content"].strip():
            return "empty_text", f"empty {turn['role']} turn"
    return None


def opens_with_user(turns: list[dict]) -> bool:
    return next((turn["role"] for turn in turns if turn["role"] != "system"), None) == "user"


class SFTDataset(Dataset):
    """Multi-turn conversations (`{"conversations"|"messages": [{"role", "content"}, ...]}` per JSONL line),
    rendered with the tokenizer's own chat template, with loss only on the assistant replies."""

    def __init__(self, files: list[str], tokenizer, max_seq_len: int, strict: bool = False, log=None):
        if tokenizer.chat_template is None:
            raise InputError("the tokenizer has no chat template")
        self.issues = DataIssues(strict=strict)
        self.samples: list[tuple[list[int], list[int]]] = []
        for location, turns in parsed_records(files, self.issues, conversation_turns):
            encoded = encode_conversation(tokenizer, turns, max_seq_len)
            if encoded is None:
                self.issues.report("too_long", location, f"no assistant token fits in max_seq_len={max_seq_len}")
                continue
            self.samples.append(encoded)
        if not self.samples:
            raise InputError(f"no usable conversations in {', '.join(files)} ({self.issues.summary()})")
        if log is not None and self.issues.total:
            log(self.issues.summary())
        self.lengths = [len(ids) for ids, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, labels = self.samples[index]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


class PadCollator:
    """Pad a batch to its longest sample (right padding): pad id for inputs, -100 for labels, 0 in the mask."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(sample["input_ids"]) for sample in samples)
        input_ids = torch.full((len(samples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), longest), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
        for row, sample in enumerate(samples):
            length = len(sample["input_ids"])
            input_ids[row, :length] = sample["input_ids"]
            labels[row, :length] = sample["labels"]
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def same_turn(first: Any, second: Any) -> bool:
    """Role and content make a turn; other keys (ids, scores) do not."""
    if isinstance(first, dict) and isinstance(second, dict):
        return (first.get("role"), first.get("content")) == (second.get("role"), second.get("content"))
    return first == second


def preference_turns(record: Any) -> tuple[tuple[list[dict], dict, dict] | None, str, str]:
    """Validate a preference record; return ((prompt turns, chosen reply, rejected reply), "", "") or
    (None, reason, detail). Accepted: TRL's {"prompt", "chosen", "rejected"}, each a string (a user turn, assistant
    replies) or a list of messages, and {"chosen", "rejected"} as whole conversations that share the prompt (TRL's
    implicit prompt, minimind's format)."""
    if not isinstance(record, dict):
        return None, "missing_field", "record is not an object"
    sides = []
    for side in ("chosen", "rejected"):
        value = record.get(side)
        if not isinstance(value, (str, list)):
            return None, "missing_side", f"no '{side}' string or message list"
        sides.append([{"role": "assistant", "content": value}] if isinstance(value, str) else value)
    chosen, rejected = sides
    prompt = record.get("prompt")
    if prompt is None:
        if isinstance(record["chosen"], str) or isinstance(record["rejected"], str):
            return None, "missing_field", "string replies need a 'prompt'"
        shared = 0
        while shared < min(len(chosen), len(rejected)) and same_turn(chosen[shared], rejected[shared]):
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    elif isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif not isinstance(prompt, list):
        return None, "missing_field", "'prompt' is neither a string nor a message list"
    problem = turn_problem(prompt)
    if problem is None:
        problem = turn_problem(chosen + rejected)
        if problem is not None and problem[0] == "empty_text":
            problem = ("empty_reply", problem[1])
    if problem:
        return None, *problem
    if len(chosen) == len(rejected) and all(map(same_turn, chosen, rejected)):
        return None, "identical", "chosen and rejected are the same reply"
    for side, reply in (("chosen", chosen), ("rejected", rejected)):
        if len(reply) != 1 or reply[0]["role"] != "assistant":
            return None, "bad_reply", f"'{side}' must be one assistant reply after the shared prompt"
    if not opens_with_user(prompt):
        return None, "bad_order", "the prompt must open with a user turn (after an optional system turn)"
    clean = [{"role": turn["role"], "content": turn["content"]} for turn in prompt]
    return (clean, {"role": "assistant", "content": chosen[0]["content"]},
            {"role": "assistant", "content": rejected[0]["content"]}), "", ""


def fit_pair(prompt: list[int], chosen: list[int], rejected: list[int],
             max_seq_len: int) -> tuple[list[int], list[int], list[int]] | None:
    """Cut a pair so that prompt + either reply fits `max_seq_len`: the prompt loses its start first (down to half the
    length, the end of a conversation matters most), then the replies lose their ends. None when nothing usable
    is left."""
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_seq_len:
        return prompt, chosen, rejected
    keep = max(max_seq_len - longest, min(len(prompt), max_seq_len // 2))
    chosen, rejected = chosen[:max_seq_len - keep], rejected[:max_seq_len - keep]
    if keep < 1 or not chosen or not rejected or chosen == rejected:
        return None
    return prompt[len(prompt) - keep:], chosen, rejected


class PreferenceDataset(Dataset):
    """Preference pairs (see `preference_turns`), rendered with the tokenizer's chat template exactly as SFT renders
    a conversation: a sample holds the prompt's tokens (ending in the generation prompt) and each reply's tokens up
    to and including its end token. `reference_logps` ([pairs, 2], set by the preference stage when it computes
    them once) travels with the samples."""

    def __init__(self, files: list[str], tokenizer, max_seq_len: int, strict: bool = False, log=None):
        if tokenizer.chat_template is None:
            raise InputError("the tokenizer has no chat template")
        self.issues = DataIssues(strict=strict)
        self.pairs: list[tuple[list[int], list[int], list[int]]] = []
        truncated = 0
        for location, (prompt_turns, *replies) in parsed_records(files, self.issues, preference_turns):
            prompt = render_chat(tokenizer, prompt_turns, add_generation_prompt=True)
            encoded = []
            for reply in replies:
                turns = prompt_turns + [reply]
                full = render_chat(tokenizer, turns)
                start, stop, _ = reply_span(tokenizer, turns, len(prompt_turns), full)
                encoded.append(full[start:stop])
            pair = fit_pair(prompt, *encoded, max_seq_len)
            if pair is None:
                self.issues.report("too_long", location, f"no distinct replies fit in max_seq_len={max_seq_len}")
                continue
            truncated += pair != (prompt, *encoded)
            self.pairs.append(pair)
        if not self.pairs:
            raise InputError(f"no usable preference pairs in {', '.join(files)} ({self.issues.summary()})")
        if log is not None and self.issues.total:
            log(self.issues.summary())
        if log is not None and truncated:
            log(f"{truncated} of {len(self.pairs)} pairs cut to data.seq_len={max_seq_len} (the prompt's start first, "
                f"then the replies' ends)")
        self.truncated = truncated
        self.lengths = [len(prompt) + max(len(chosen), len(rejected)) for prompt, chosen, rejected in self.pairs]
        self.reference_logps: torch.Tensor | None = None

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.pairs).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        prompt, chosen, rejected = self.pairs[index]
        sample = {"prompt": torch.tensor(prompt), "chosen": torch.tensor(chosen), "rejected": torch.tensor(rejected)}
        if self.reference_logps is not None:
            sample["reference_logps"] = self.reference_logps[index]
        return sample


class PairCollator:
    """B pairs as one batch of 2B rows, the B prompt + chosen sequences then the B prompt + rejected ones, so both
    sides go through the model in one forward; right-padded to the longest row, labels on the replies only."""

    def __init__(self, pad_token_id: int):
        self.pad = PadCollator(pad_token_id)

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        rows = [{"input_ids": torch.cat([sample["prompt"], sample[side]]),
                 "labels": torch.cat([torch.full_like(sample["prompt"], -100), sample[side]])}
                for side in ("chosen", "rejected") for sample in samples]
        batch = self.pad(rows)
        if "reference_logps" in samples[0]:
            batch["reference_logps"] = torch.stack([sample["reference_logps"] for sample in samples])
        return batch


def prompt_record(record: Any) -> tuple[tuple[str | list[dict], dict] | None, str, str]:
    """Validate a prompt record (online RL): `prompt` is plain text or a list of chat messages; every other key is
    a column the reward functions receive. Returns ((prompt, columns), "", "") or (None, reason, detail)."""
    if not isinstance(record, dict):
        return None, "missing_field", "record is not an object"
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            return None, "empty_text", "empty 'prompt'"
    elif isinstance(prompt, list) and prompt:
        problem = turn_problem(prompt)
        if problem:
            return None, *problem
        if prompt[-1]["role"] == "assistant" or not opens_with_user(prompt):
            return None, "bad_order", "the prompt must open with a user turn and not end with an assistant turn"
        prompt = [{"role": turn["role"], "content": turn["content"]} for turn in prompt]
    else:
        return None, "missing_field", "no 'prompt' string or message list"
    return (prompt, {key: value for key, value in record.items() if key != "prompt"}), "", ""


class PromptDataset(Dataset):
    """Prompts for online RL (`{"prompt": str | messages, ...other columns}` per JSONL line), as TRL's GRPOTrainer
    reads them: plain text is tokenized as it is, a message list is rendered with the chat template and its
    generation prompt. A prompt that leaves no room for `completion_tokens` within `max_seq_len` is a bad record."""

    def __init__(self, files: list[str], tokenizer, max_seq_len: int, completion_tokens: int, strict: bool = False,
                 log=None):
        self.issues = DataIssues(strict=strict)
        self.prompts: list[str | list[dict]] = []
        self.columns: list[dict] = []
        self.ids: list[list[int]] = []
        for location, (prompt, columns) in parsed_records(files, self.issues, prompt_record):
            if isinstance(prompt, list):
                if tokenizer.chat_template is None:
                    raise InputError(f"{location}: a message-list prompt needs a tokenizer with a chat template")
                ids = render_chat(tokenizer, prompt, add_generation_prompt=True)
            else:
                ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if len(ids) + completion_tokens > max_seq_len:
                self.issues.report("too_long", location, f"a prompt of {len(ids)} tokens leaves no room for "
                                   f"{completion_tokens} completion tokens in data.seq_len={max_seq_len}")
                continue
            self.prompts.append(prompt)
            self.columns.append(columns)
            self.ids.append(ids)
        if not self.ids:
            raise InputError(f"no usable prompts in {', '.join(files)} ({self.issues.summary()})")
        if log is not None and self.issues.total:
            log(self.issues.summary())
        self.column_names = sorted({name for columns in self.columns for name in columns})
        self.lengths = [len(ids) for ids in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": torch.tensor(self.ids[index]), "prompt": self.prompts[index],
                "columns": {name: self.columns[index].get(name) for name in self.column_names}}


class PromptCollator:
    """Prompts left-padded to the longest (generation continues from the right edge), with the raw prompts and the
    columns, one list per column, that the reward functions receive."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict]) -> dict:
        longest = max(len(sample["input_ids"]) for sample in samples)
        input_ids = torch.full((len(samples), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
        for row, sample in enumerate(samples):
            length = len(sample["input_ids"])
            input_ids[row, longest - length:] = sample["input_ids"]
            attention_mask[row, longest - length:] = 1
        columns = {name: [sample["columns"][name] for sample in samples] for name in samples[0]["columns"]}
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "prompts": [sample["prompt"] for sample in samples], "columns": columns}
