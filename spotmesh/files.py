"""Writing files and directories so a reader (another process, a crash, a restart) never sees
half of one."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def publish_directory(tmp: Path, out: Path, is_current: Callable[[Path], bool]) -> None:
    """Move the finished directory ``tmp`` to ``out``. If ``out`` exists: keep it when
    ``is_current(out)`` (a concurrent writer won the race with the same content), else swap it
    aside first, so readers see the old directory or the new one, never a mix."""
    try:
        os.rename(tmp, out)  # succeeds when out is missing or an empty dir
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if is_current(out):
        return
    trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
    os.rename(out, trash)
    try:
        os.rename(tmp, out)
    except OSError:
        if not is_current(out):
            raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)
