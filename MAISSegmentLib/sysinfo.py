"""What the machine can give us: available memory (to refuse work that would crash with OOM)."""

from __future__ import annotations

import os


def available_memory_bytes() -> int | None:
    """Memory a new allocation can use now, in bytes (Linux ``MemAvailable``; else free pages), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(nbytes: int, what: str, advice: str) -> None:
    """Raise ``MemoryError`` with a clear message when ``nbytes`` exceed the available memory."""
    avail = available_memory_bytes()
    if avail is not None and nbytes > avail:
        raise MemoryError(
            f"{what} needs {nbytes / 2**30:.1f} GiB but only {avail / 2**30:.1f} GiB of memory is available; {advice}"
        )
