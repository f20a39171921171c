"""Files and folders that appear whole or not at all: written beside their final place, flushed to disk, then
renamed over it, so that neither a crash nor a concurrent reader ever sees a half-written one."""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def open_atomically(path: str | Path) -> Iterator[BinaryIO]:
    """A binary handle on a temporary file beside `path`; when the block ends without an error the file is flushed
    to disk and renamed to `path`, otherwise removed and `path` left as it was."""
    path = Path(path)
    # The process id keeps two processes writing the same file at once (runs sharing a cache) apart.
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomically(path: str | Path, data: str | bytes) -> None:
    """Replace `path` with `data` (text as UTF-8) in one step."""
    with open_atomically(path) as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)


def fsync_tree(folder: Path) -> None:
    """Flush every file, then the folder, so a rename never publishes a folder whose files are still in flight."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish_folder(temporary: Path, final: Path) -> None:
    """Make a finished temporary folder `final`: fsync it, then rename. A folder cannot be swapped in one step: an
    existing `final` is renamed to `.<name>.old` first and deleted only once the new one is in place, so a complete
    version exists at every moment, under one of the two names."""
    fsync_tree(temporary)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        temporary.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        temporary.rename(final)
