"""utils/data.py preference pairs: TRL and minimind formats, bad records, truncation (fit_pair) and PairCollator."""

import copy
import re

import pytest
import torch

from helpers import BOS, EOS, PAD, write_lines
from utils.data import PairCollator, PreferenceDataset, encode_conversation, fit_pair, preference_turns
from utils.errors import InputError

QUESTION, GOOD, BAD = "What is 2 + 3?", "2 + 3 = 5.", "It is 6."
SYSTEM = {"role": "system", "content": "Answer briefly."}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def rendered(tokenizer, turns, **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(turns, tokenize=True, **kwargs)["input_ids"]


def load(tmp_path, tokenizer, records, max_seq_len=1024, **kwargs) -> PreferenceDataset:
    return PreferenceDataset([str(write_lines(tmp_path / "pairs.jsonl", records))], tokenizer, max_seq_len, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------------------

SAME_PAIR = {
    "trl_strings": {"prompt": QUESTION, "chosen": GOOD, "rejected": BAD},
    "trl_explicit_prompt": {"prompt": [user(QUESTION)], "chosen": [assistant(GOOD)], "rejected": [assistant(BAD)]},
    "string_prompt_message_replies": {"prompt": QUESTION, "chosen": [assistant(GOOD)], "rejected": [assistant(BAD)]},
    # TRL's implicit prompt and minimind's format: whole conversations sharing their start.
    "implicit_prompt": {"chosen": [user(QUESTION), assistant(GOOD)], "rejected": [user(QUESTION), assistant(BAD)]},
}

MULTI_TURN_PROMPT = [SYSTEM, user("Hi."), assistant("Hello! How can I help?"), user(QUESTION)]
SAME_MULTI_TURN_PAIR = {
    "trl_explicit_prompt": {"prompt": MULTI_TURN_PROMPT, "chosen": [assistant(GOOD)], "rejected": [assistant(BAD)]},
    "implicit_prompt": {"chosen": MULTI_TURN_PROMPT + [assistant(GOOD)],
                        "rejected": MULTI_TURN_PROMPT + [assistant(BAD)]},
    "extra_keys": {"prompt": [{**turn, "id": n} for n, turn in enumerate(MULTI_TURN_PROMPT)],
                   "chosen": [{**assistant(GOOD), "score": 9}], "rejected": [assistant(BAD)], "source": "x"},
}


@pytest.mark.parametrize("records,prompt_turns", [(SAME_PAIR, [user(QUESTION)]),
                                                  (SAME_MULTI_TURN_PAIR, MULTI_TURN_PROMPT)],
                         ids=["one_turn", "multi_turn"])
def test_formats_parse_to_the_same_pair(records, prompt_turns):
    for name, record in records.items():
        assert preference_turns(record) == ((prompt_turns, assistant(GOOD), assistant(BAD)), "", ""), name


@pytest.mark.parametrize("records,prompt_turns", [(SAME_PAIR, [user(QUESTION)]),
                                                  (SAME_MULTI_TURN_PAIR, MULTI_TURN_PROMPT)],
                         ids=["one_turn", "multi_turn"])
def test_formats_tokenize_as_sft_renders_the_conversation(tmp_path, tokenizer, records, prompt_turns):
    dataset = load(tmp_path, tokenizer, list(records.values()))
    assert len(dataset) == len(records) and dataset.issues.total == 0 and dataset.truncated == 0
    assert all(pair == dataset.pairs[0] for pair in dataset.pairs)
    prompt, chosen, rejected = dataset.pairs[0]
    assert prompt == rendered(tokenizer, prompt_turns, add_generation_prompt=True) and prompt[0] == BOS
    assert tokenizer.decode(prompt[-1:], skip_special_tokens=False) == "<|assistant|>"
    for reply, text in ((chosen, GOOD), (rejected, BAD)):
        assert reply[-1] == EOS and tokenizer.decode(reply, skip_special_tokens=False) == text + "<|SEOS|>"
        full = rendered(tokenizer, prompt_turns + [assistant(text)])
        # Prompt + reply is the rendered conversation up to the end token; the template's newline after it is left.
        assert full[:len(prompt) + len(reply)] == prompt + reply
        assert tokenizer.decode(full[len(prompt) + len(reply):]) == "\n"
        # ... and the reply is exactly what SFT trains on as the conversation's last turn.
        ids, labels = encode_conversation(tokenizer, prompt_turns + [assistant(text)], 1024)
        assert ids == full and labels[len(prompt):] == reply + [-100]


def test_implicit_prompt_shares_only_the_common_start():
    # The conversations differ from the first assistant turn on, so each side holds more than one reply.
    record = {"chosen": [user("Hi."), assistant("Hello."), user(QUESTION), assistant(GOOD)],
              "rejected": [user("Hi."), assistant("Go away."), user(QUESTION), assistant(BAD)]}
    parsed, reason, _ = preference_turns(record)
    assert parsed is None and reason == "bad_reply"


@pytest.mark.parametrize("record,expected", [
    ({"prompt": QUESTION, "chosen": [{**assistant(GOOD), "id": 1}], "rejected": [{**assistant(GOOD), "id": 2}]},
     (None, "identical")),
    ({"chosen": [{**user(QUESTION), "id": 1}, assistant(GOOD)],
      "rejected": [{**user(QUESTION), "id": 2}, assistant(BAD)]},
     (([user(QUESTION)], assistant(GOOD), assistant(BAD)), "")),
], ids=["identical_replies", "shared_prompt"])
def test_only_role_and_content_make_a_turn(record, expected):
    # The explicit-prompt form and SFT records already drop other keys (ids, names, scores) from every turn.
    parsed, reason, _ = preference_turns(record)
    assert (parsed, reason) == expected


# ---------------------------------------------------------------------------------------------------------------
# Bad records
# ---------------------------------------------------------------------------------------------------------------

GOOD_RECORD = SAME_PAIR["trl_strings"]
LINES = [
    GOOD_RECORD,                                                                                  # 1
    '{"prompt": "Hi", "chosen": "Hello"',                                                         # 2 malformed_json
    {"prompt": QUESTION, "chosen": GOOD},                                                         # 3 missing_side
    {"prompt": QUESTION, "chosen": GOOD, "rejected": GOOD},                                       # 4 identical
    {"prompt": QUESTION, "chosen": "   ", "rejected": BAD},                                       # 5 empty_reply
    {"prompt": [{"role": "robot", "content": QUESTION}], "chosen": GOOD, "rejected": BAD},        # 6 bad_role
    {"prompt": QUESTION, "chosen": [assistant(GOOD), assistant("More.")], "rejected": BAD},       # 7 bad_reply
    "",                                                                                           # 8 blank: ignored
    {"chosen": [user(QUESTION), assistant(GOOD)], "rejected": [user(QUESTION), assistant(GOOD)]},  # 9 identical
    {"chosen": [user(QUESTION), assistant(GOOD)], "rejected": [user("Other?"), assistant(BAD)]},  # 10 bad_reply
    {"prompt": QUESTION, "chosen": [user(GOOD)], "rejected": [assistant(BAD)]},                   # 11 bad_reply
    {"prompt": QUESTION, "chosen": "", "rejected": BAD},                                          # 12 empty_reply
    {"prompt": QUESTION, "rejected": BAD},                                                        # 13 missing_side
    SAME_PAIR["implicit_prompt"],                                                                 # 14
]
EXPECTED_COUNTS = {"malformed_json": 1, "missing_side": 2, "identical": 2, "empty_reply": 2, "bad_role": 1,
                   "bad_reply": 3}
FIRST_LINE = {"malformed_json": 2, "missing_side": 3, "identical": 4, "empty_reply": 5, "bad_role": 6, "bad_reply": 7}


def test_bad_records_are_skipped_and_counted_with_their_lines(tmp_path, tokenizer):
    logged = []
    dataset = load(tmp_path, tokenizer, LINES, log=logged.append)
    path = tmp_path / "pairs.jsonl"
    assert len(dataset) == 2 and dataset.pairs[0] == dataset.pairs[1]
    assert dict(dataset.issues.counts) == EXPECTED_COUNTS and dataset.issues.total == 11
    for reason, line in FIRST_LINE.items():
        assert dataset.issues.examples[reason][0] == f"{path}:{line}"
    assert dataset.issues.examples["bad_reply"] == [f"{path}:7", f"{path}:10", f"{path}:11"]
    assert dataset.issues.first.startswith(f"{path}:2: malformed JSON")
    assert logged == [dataset.issues.summary()] and logged[0].startswith("skipped 11 bad records: ")


@pytest.mark.parametrize("reason", list(FIRST_LINE))
def test_strict_raises_at_the_first_bad_line(tmp_path, tokenizer, reason):
    line = FIRST_LINE[reason]
    # Good lines around the bad one, so that its line number is not 1.
    records = [GOOD_RECORD, GOOD_RECORD, LINES[line - 1], GOOD_RECORD] + LINES[1:]
    path = tmp_path / "pairs.jsonl"
    with pytest.raises(InputError, match="^" + re.escape(f"{path}:3: ")) as error:
        load(tmp_path, tokenizer, records, strict=True)
    assert "data.strict=false" in str(error.value)
    without_strict = load(tmp_path, tokenizer, records)
    assert without_strict.issues.examples[reason][0] == f"{path}:3"


def test_no_usable_pair_raises(tmp_path, tokenizer):
    with pytest.raises(InputError, match=r"no usable preference pairs in .*pairs\.jsonl .*skipped 3 bad records"):
        load(tmp_path, tokenizer, LINES[1:4])
    with pytest.raises(InputError, match="data file not found"):
        PreferenceDataset([str(tmp_path / "missing.jsonl")], tokenizer, 1024)


def test_tokenizer_without_chat_template_raises(tmp_path, tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(InputError, match="the tokenizer has no chat template"):
        load(tmp_path, plain, [GOOD_RECORD])


# ---------------------------------------------------------------------------------------------------------------
# Truncation
# ---------------------------------------------------------------------------------------------------------------

def test_fit_pair_cuts_the_prompt_start_then_the_reply_ends():
    prompt, chosen, rejected = list(range(10)), [100, 101], [200, 201, 202]
    assert fit_pair(prompt, chosen, rejected, 13) == (prompt, chosen, rejected)  # fits: untouched
    assert fit_pair(prompt, chosen, rejected, 8) == (prompt[5:], chosen, rejected)  # the prompt's end is kept
    # Long replies: the prompt keeps half the length, the replies their starts.
    long_chosen, long_rejected = list(range(100, 110)), list(range(200, 208))
    assert fit_pair(prompt, long_chosen, long_rejected, 8) == (prompt[6:], long_chosen[:4], long_rejected[:4])
    short_prompt = [1, 2]  # less than half: kept whole
    assert fit_pair(short_prompt, long_chosen, long_rejected, 8) == (short_prompt, long_chosen[:6],
                                                                     long_rejected[:6])
    # Replies that only differ after the cut are no longer a preference.
    assert fit_pair(prompt, [7] * 6 + [1], [7] * 6 + [2], 8) is None
    assert fit_pair(prompt, chosen, rejected, 1) is None


LONG_PROMPT = [user("Tell me about the weather. " * 12), assistant("It is sunny. " * 6), user(QUESTION)]


def test_long_pairs_lose_the_prompt_start_first(tmp_path, tokenizer):
    records = [{"prompt": LONG_PROMPT, "chosen": GOOD, "rejected": BAD}, GOOD_RECORD]
    full = load(tmp_path, tokenizer, records)
    prompt, chosen, rejected = full.pairs[0]
    max_seq_len = len(prompt) // 2 + max(len(chosen), len(rejected))
    logged = []
    dataset = load(tmp_path, tokenizer, records, max_seq_len=max_seq_len, log=logged.append)
    assert dataset.truncated == 1 and len(dataset) == 2 and dataset.issues.total == 0
    assert logged == [f"1 of 2 pairs cut to data.seq_len={max_seq_len} (the prompt's start first, then the replies' "
                      f"ends)"]
    cut_prompt, cut_chosen, cut_rejected = dataset.pairs[0]
    assert (cut_chosen, cut_rejected) == (chosen, rejected)  # the replies are whole
    assert cut_prompt == prompt[len(prompt) - len(cut_prompt):]  # the end of the prompt
    assert len(cut_prompt) + max(len(chosen), len(rejected)) == max_seq_len
    assert tokenizer.decode(cut_prompt[-1:], skip_special_tokens=False) == "<|assistant|>"
    assert dataset.pairs[1] == full.pairs[1]  # a short pair is untouched
    short_prompt, short_chosen, short_rejected = full.pairs[1]
    assert dataset.lengths == [max_seq_len, len(short_prompt) + max(len(short_chosen), len(short_rejected))]


def test_long_replies_lose_their_ends_after_the_prompt(tmp_path, tokenizer):
    long_good, long_bad = "Five. " * 30, "Six. " * 40
    records = [{"prompt": LONG_PROMPT, "chosen": long_good, "rejected": long_bad}]
    prompt, chosen, rejected = load(tmp_path, tokenizer, records).pairs[0]
    max_seq_len = 40
    dataset = load(tmp_path, tokenizer, records, max_seq_len=max_seq_len)
    cut_prompt, cut_chosen, cut_rejected = dataset.pairs[0]
    assert dataset.truncated == 1
    assert cut_prompt == prompt[-(max_seq_len // 2):]
    assert cut_chosen == chosen[:max_seq_len - len(cut_prompt)] and cut_rejected == rejected[:len(cut_chosen)]
    assert len(cut_prompt) + len(cut_chosen) <= max_seq_len and len(cut_prompt) + len(cut_rejected) <= max_seq_len


def test_pair_without_distinct_replies_after_the_cut_is_skipped(tmp_path, tokenizer):
    shared = "The answer, after careful thought, is " * 8
    records = [GOOD_RECORD, {"prompt": QUESTION, "chosen": shared + "5.", "rejected": shared + "6."}]
    dataset = load(tmp_path, tokenizer, records, max_seq_len=48)
    assert len(dataset) == 1 and dict(dataset.issues.counts) == {"too_long": 1}
    assert dataset.issues.examples["too_long"] == [f"{tmp_path / 'pairs.jsonl'}:2"]
    assert "max_seq_len=48" in dataset.issues.first
    with pytest.raises(InputError, match=re.escape("pairs.jsonl:2: no distinct replies fit in max_seq_len=48")):
        load(tmp_path, tokenizer, records, max_seq_len=48, strict=True)


# ---------------------------------------------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------------------------------------------

def test_pair_collator_lays_out_chosen_rows_then_rejected_rows(tmp_path, tokenizer):
    records = [GOOD_RECORD,
               {"prompt": [SYSTEM, user("Name a colour.")], "chosen": "Blue.", "rejected": "A cat, I think."},
               {"prompt": "Hi", "chosen": "Hello! Nice to meet you.", "rejected": "No."}]
    dataset = load(tmp_path, tokenizer, records)
    batch = PairCollator(PAD)([dataset[index] for index in range(3)])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    rows = [(prompt, chosen) for prompt, chosen, _ in dataset.pairs] + [(prompt, rejected) for prompt, _, rejected in
                                                                       dataset.pairs]
    width = max(len(prompt) + len(reply) for prompt, reply in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (6, width)
    for row, (prompt, reply) in enumerate(rows):
        length, ids = len(prompt) + len(reply), batch["input_ids"][row].tolist()
        assert ids[:length] == prompt + reply and ids[length:] == [PAD] * (width - length)
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (width - length)
        assert batch["labels"][row].tolist() == [-100] * len(prompt) + reply + [-100] * (width - length)


def test_pair_collator_carries_reference_logps(tmp_path, tokenizer):
    dataset = load(tmp_path, tokenizer, [GOOD_RECORD, SAME_MULTI_TURN_PAIR["trl_explicit_prompt"]])
    dataset.reference_logps = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    batch = PairCollator(PAD)([dataset[1], dataset[0]])
    assert torch.equal(batch["reference_logps"], torch.tensor([[-3.0, -4.0], [-1.0, -2.0]]))
    assert batch["input_ids"].shape[0] == 4
