"""utils/data.py records: read_records, document_texts, and skipped or strict bad records (DataIssues)."""

import re

import pytest

from helpers import MULTI_TURNS, TWO_TURNS, expected_stream, unpack, write_lines
from utils.data import DataIssues, PretrainDataset, SFTDataset, document_texts, encode_conversation, read_records
from utils.errors import InputError


def test_read_records_skips_blank_lines_and_numbers_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    assert list(read_records([path])) == [(f"{path}:1", {"text": "a"}), (f"{path}:3", {"text": "b"})]


def test_read_records_names_file_and_line_of_malformed_json(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(InputError, match=r"data\.jsonl:2: malformed JSON"):
        list(read_records([path]))
    with pytest.raises(InputError, match="data file not found"):
        list(read_records([tmp_path / "missing.jsonl"]))


def test_document_texts():
    assert document_texts({"text": "hello"}) == ["hello"]
    conversation = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hi"}]
    assert document_texts({"conversations": conversation}) == ["你好", "hi"]
    assert document_texts({"messages": conversation}) == ["你好", "hi"]
    assert document_texts({"title": "x"}) == [] and document_texts([1, 2]) == []


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------

GOOD = {"conversations": TWO_TURNS}
SFT_LINES = [
    GOOD,                                                                                        # 1
    '{"conversations": [{"role": "user", "content": "hi"}',                                     # 2 malformed_json
    {"text": "pretraining text, not a conversation"},                                           # 3 missing_field
    {"conversations": [{"role": "robot", "content": "beep"}, TWO_TURNS[1]]},                   # 4 bad_role
    "",                                                                                          # 5 blank: ignored
    {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},  # 6 empty_text
    {"conversations": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},  # 7 no_assistant
    {"messages": MULTI_TURNS},                                                                   # 8
    "not json at all",                                                                           # 9 malformed_json
    [1, 2],                                                                                      # 10 missing_field
    {"conversations": [{"role": "user"}, TWO_TURNS[1]]},                                       # 11 missing_field
    {"conversations": []},                                                                       # 12 missing_field
    {"conversations": [{"role": "user", "content": ""}, TWO_TURNS[1]]},                        # 13 empty_text
    GOOD,                                                                                        # 14
]


def test_sft_bad_lines_are_skipped_and_counted(tmp_path, tokenizer):
    path = write_lines(tmp_path / "sft.jsonl", SFT_LINES)
    logged = []
    dataset = SFTDataset([str(path)], tokenizer, max_seq_len=1024, log=logged.append)
    assert len(dataset) == 3
    assert dict(dataset.issues.counts) == {"malformed_json": 2, "missing_field": 4, "bad_role": 1, "empty_text": 2,
                                           "no_assistant": 1}
    assert dataset.issues.total == 10
    at = lambda *lines: [f"{path}:{line}" for line in lines]  # noqa: E731
    assert dataset.issues.examples == {"malformed_json": at(2, 9), "missing_field": at(3, 10, 11),  # first 3 only
                                       "bad_role": at(4), "empty_text": at(6, 13), "no_assistant": at(7)}
    summary = dataset.issues.summary()
    assert summary.startswith("skipped 10 bad records: ")
    for part in (f"malformed_json 2 (first: {path}:2, {path}:9)", f"bad_role 1 (first: {path}:4)",
                 f"missing_field 4 (first: {path}:3, {path}:10, {path}:11)", f"no_assistant 1 (first: {path}:7)",
                 f"empty_text 2 (first: {path}:6, {path}:13)"):
        assert part in summary
    assert logged == [summary]
    ids, _ = encode_conversation(tokenizer, MULTI_TURNS, 1024)
    assert dataset[1]["input_ids"].tolist() == ids
    assert DataIssues().summary() == "no bad records"


@pytest.mark.parametrize("first_bad,reason", [(2, "malformed JSON"), (4, "role 'robot' is not one of"),
                                              (6, "empty assistant turn"), (7, "no assistant turn"),
                                              (3, "no 'conversations' or 'messages' list")])
def test_sft_strict_raises_at_the_first_bad_line(tmp_path, tokenizer, first_bad, reason):
    lines = [line for number, line in enumerate(SFT_LINES, 1) if number == first_bad or number in (1, 5, 8, 9, 14)]
    path = write_lines(tmp_path / "sft.jsonl", lines)
    line_number = lines.index(SFT_LINES[first_bad - 1]) + 1
    with pytest.raises(InputError, match=re.escape(f"{path}:{line_number}: ") + ".*" + re.escape(reason)):
        SFTDataset([str(path)], tokenizer, max_seq_len=1024, strict=True)


def test_sft_strict_reports_first_of_several(tmp_path, tokenizer):
    path = write_lines(tmp_path / "sft.jsonl", SFT_LINES)
    with pytest.raises(InputError, match=re.escape(f"{path}:2: malformed JSON")) as error:
        SFTDataset([str(path)], tokenizer, max_seq_len=1024, strict=True)
    assert "data.strict=false" in str(error.value)


def test_sft_only_bad_lines_raise(tmp_path, tokenizer):
    path = write_lines(tmp_path / "bad.jsonl", [SFT_LINES[1], SFT_LINES[3], SFT_LINES[6]])
    with pytest.raises(InputError, match=r"no usable conversations in .*bad\.jsonl.*skipped 3 bad records"):
        SFTDataset([str(path)], tokenizer, max_seq_len=1024)
    with pytest.raises(InputError, match="data file not found"):
        SFTDataset([str(tmp_path / "missing.jsonl")], tokenizer, max_seq_len=1024)


PRETRAIN_LINES = [
    {"text": "a good document"},        # 1
    '{"text": "unterminated',           # 2 malformed_json
    {"title": "no text field"},         # 3 missing_text
    {"text": 5},                        # 4 missing_text
    {"text": "   "},                    # 5 empty_text
    "",                                 # 6 blank: ignored
    {"text": "another good one"},       # 7
    [1, 2],                             # 8 missing_text
    {"text": ""},                       # 9 empty_text
]


def test_pretrain_bad_lines_are_skipped_and_counted(tmp_path, tokenizer):
    path = write_lines(tmp_path / "train.jsonl", PRETRAIN_LINES)
    logged = []
    dataset = PretrainDataset([str(path)], tokenizer, 3, cache_dir=tmp_path / "cache", log=logged.append)
    meta = dataset.meta
    assert meta["skipped"] == {"malformed_json": 1, "missing_text": 3, "empty_text": 2}
    assert meta["skipped_examples"] == {"malformed_json": [f"{path}:2"], "missing_text": [f"{path}:3", f"{path}:4",
                                        f"{path}:8"], "empty_text": [f"{path}:5", f"{path}:9"]}
    assert meta["num_documents"] == 2
    stream = expected_stream(tokenizer, ["a good document", "another good one"])
    assert meta["num_tokens"] == len(stream) and unpack(dataset) == stream[:1 + len(dataset) * 3]
    assert len(logged) == 1 and logged[0].startswith("skipped 6 bad records")


def test_pretrain_strict_raises_at_the_first_bad_line(tmp_path, tokenizer):
    path = write_lines(tmp_path / "train.jsonl", PRETRAIN_LINES)
    with pytest.raises(InputError, match=re.escape(f"{path}:2: malformed JSON")):
        PretrainDataset([str(path)], tokenizer, 3, cache_dir=tmp_path / "cache", strict=True)
    path = write_lines(tmp_path / "train2.jsonl", [PRETRAIN_LINES[0], PRETRAIN_LINES[4], PRETRAIN_LINES[2]])
    with pytest.raises(InputError, match=re.escape(f"{path}:2: empty text")):
        PretrainDataset([str(path)], tokenizer, 3, cache_dir=tmp_path / "cache", strict=True)
    assert not list((tmp_path / "cache").iterdir())  # nothing half-written left behind



def test_pretrain_strict_raises_even_when_a_lenient_cache_exists(tmp_path, tokenizer):
    path = write_lines(tmp_path / "train.jsonl", PRETRAIN_LINES)
    PretrainDataset([str(path)], tokenizer, 3, cache_dir=tmp_path / "cache")
    with pytest.raises(InputError, match=re.escape(f"{path}:2: malformed JSON")):
        PretrainDataset([str(path)], tokenizer, 3, cache_dir=tmp_path / "cache", strict=True)

def test_pretrain_only_bad_lines_raise(tmp_path, tokenizer):
    path = write_lines(tmp_path / "bad.jsonl", PRETRAIN_LINES[1:6])
    with pytest.raises(InputError, match=r"no usable documents in .*bad\.jsonl.*skipped 4 bad records"):
        PretrainDataset([str(path)], tokenizer, 3, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())

