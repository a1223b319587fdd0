"""Writing files so that a reader never sees a partial file and a failure never destroys an old one."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], suffix: str = "") -> None:
    """Run ``write(tmp)`` on a hidden temporary file beside ``path``, flush it to disk, rename it over ``path``.

    Args:
        path: destination; its folder is created. An existing file is replaced only by a complete new one.
        write: writes the whole content to the path it is given.
        suffix: ending of the temporary name (some writers pick the format from it, e.g. ``.nii.gz``).

    Raises:
        OSError: the folder cannot be created or the file cannot be written (the temporary file is removed,
            an existing ``path`` is left as it was). Callers turn it into their own error type.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its 0600 mode would stay on the final file. A unique name in the same folder
    # (same file system, so the rename is atomic), created with the usual umask.
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}"
    try:
        write(tmp)
        with open(tmp, "r+b") as f:  # writable handle: Windows cannot fsync a read-only one
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write` of a UTF-8 text file."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
