"""utils/files.py: files and folders replaced in one step, never left half-written."""

import os

import pytest

from utils.files import open_atomically, publish_folder, write_atomically


def tree(folder) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> content)."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


def test_write_atomically_text_as_utf8(tmp_path):
    path = tmp_path / "config.yaml"
    write_atomically(path, "name: 星辰\n")
    assert path.read_bytes() == "name: 星辰\n".encode("utf-8")
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_write_atomically_bytes_replaces_existing(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old content that is longer")
    write_atomically(str(path), b"\x00\x01\xff")
    assert path.read_bytes() == b"\x00\x01\xff"
    assert os.listdir(tmp_path) == ["weights.bin"]


def test_open_atomically_publishes_only_when_the_block_ends(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    with open_atomically(path) as handle:
        handle.write(b"new")
        assert path.read_text() == "old"  # a reader still sees the complete old file
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["state.json"]


def test_open_atomically_failure_leaves_the_original(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("original")
    with pytest.raises(RuntimeError, match="disk full"):
        with open_atomically(path) as handle:
            handle.write(b"half")
            raise RuntimeError("disk full")
    assert path.read_text() == "original"
    assert os.listdir(tmp_path) == ["state.json"]


def test_open_atomically_failure_creates_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with open_atomically(tmp_path / "new.json") as handle:
            handle.write(b"half")
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_publish_folder_to_a_new_place(tmp_path):
    temporary = tmp_path / ".final.tmp"
    (temporary / "sub").mkdir(parents=True)
    (temporary / "model.safetensors").write_bytes(b"weights")
    (temporary / "sub" / "notes.txt").write_text("hello")
    publish_folder(temporary, tmp_path / "final")
    assert tree(tmp_path / "final") == {"model.safetensors": b"weights", "sub/notes.txt": b"hello"}
    assert os.listdir(tmp_path) == ["final"]


def test_publish_folder_replaces_an_existing_folder(tmp_path):
    final = tmp_path / "final"
    (final / "old_sub").mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"old weights")
    (final / "stale.txt").write_text("from the previous save")
    (final / "old_sub" / "x").write_text("x")
    # A leftover from an earlier interrupted publish must not get in the way.
    (tmp_path / ".final.old").mkdir()
    (tmp_path / ".final.old" / "junk").write_text("junk")
    temporary = tmp_path / ".final.tmp"
    temporary.mkdir()
    (temporary / "model.safetensors").write_bytes(b"new weights")
    (temporary / "config.json").write_text("{}")
    publish_folder(temporary, final)
    assert tree(final) == {"config.json": b"{}", "model.safetensors": b"new weights"}
    assert os.listdir(tmp_path) == ["final"]
