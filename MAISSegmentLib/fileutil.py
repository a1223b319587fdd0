"""Writing files so that a reader never sees a partial file and a failure never destroys an old one; checking
output paths (writable, not one of the inputs) before any work is done."""

from __future__ import annotations

import contextlib
import os
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
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
    tmp = _temporary_name(dest, suffix)
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


def atomic_write_many(writes: Sequence[tuple[str | os.PathLike, Callable[[Path], None], str]]) -> None:
    """Write several files so that either all of them are replaced or none is.

    Every ``write(tmp)`` runs on a temporary file beside its destination first; only when all of them succeeded are
    the temporary files renamed over their destinations (one rename each, in the order given). A failure before the
    renames leaves every destination as it was and removes the temporary files.

    Args:
        writes: ``(path, write, suffix)`` per file, as for :func:`atomic_write`.

    Raises:
        OSError: a folder cannot be created or a file cannot be written. Errors the ``write`` callables raise
            (e.g. :class:`~MAISSegmentLib.errors.ImageError`) pass through unchanged.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write, suffix in writes:
            dest = Path(path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temporary_name(dest, suffix)
            staged.append((tmp, dest))
            write(tmp)
            with open(tmp, "r+b") as f:
                os.fsync(f.fileno())
        for tmp, dest in staged:
            os.replace(tmp, dest)
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def _temporary_name(dest: Path, suffix: str = "") -> Path:
    """A unique hidden file name beside ``dest`` (same folder, so a rename onto ``dest`` is atomic)."""
    return dest.parent / f".{dest.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}"


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file: the same file on disk when both exist (symbolic and hard links, case
    folding file systems), else the same absolute path once symbolic links and ``..`` are resolved."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    with contextlib.suppress(OSError):
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
    return pa.resolve() == pb.resolve()


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` lies inside ``folder`` (or is it), after resolving symbolic links."""
    p, f = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    return p == f or f in p.parents


def writable_problem(path: str | os.PathLike, folder: bool = False) -> str | None:
    """Why ``path`` cannot be written (created or replaced), or ``None`` when it can.

    Checked without writing anything the user would see: the path must not be a folder (unless ``folder``) nor an
    existing read-only file (its write permission bits are all off: someone protected it), and its nearest existing
    folder must be a folder we may create files in (``os.access``: permissions, ACLs and read-only mounts count;
    nothing is written, so even the folder's modification time stays). A missing folder on the way is fine: the
    writers create it.

    Args:
        path: the file (or, with ``folder``, the folder) to be written.
        folder: ``path`` is a folder that will receive files.
    """
    p = Path(path).expanduser()
    if p.is_dir() and not folder:
        return f"{p} is a folder; give a file name"
    if p.exists() and not p.is_dir():
        if folder:
            return f"{p} is a file, not a folder"
        if not p.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) or not os.access(p, os.W_OK):
            return f"{p} is read-only; make it writable or choose another file name"
    parent = p if folder and p.is_dir() else p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create {p}: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write into the folder {parent}: no permission, or a read-only drive"
    return None


def move_aside(folder: str | os.PathLike, names: Iterable[str], prefix: str = "previous-") -> Path | None:
    """Move the existing entries ``names`` of ``folder`` into a new time-stamped sub-folder, so nothing is lost.

    Returns:
        The new sub-folder (``folder/<prefix>YYYYmmdd-HHMMSS[-n]``), or ``None`` when none of ``names`` existed.

    Raises:
        OSError: an entry cannot be moved (those moved before stay in the sub-folder).
    """
    base = Path(folder)
    present = [base / n for n in names if (base / n).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup, n = base / f"{prefix}{stamp}", 1
    while backup.exists():
        n += 1
        backup = base / f"{prefix}{stamp}-{n}"
    backup.mkdir()
    for entry in present:
        os.replace(entry, backup / entry.name)
    return backup
