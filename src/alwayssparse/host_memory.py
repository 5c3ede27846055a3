"""Keep freed host memory for reuse, so that a CPU training step does not page-fault on the
activations and gradients it frees and allocates again at every step.

With its default settings glibc's malloc serves a block above its mmap threshold (128 KiB at
first, raised after such a block is freed, to at most 32 MiB) with a fresh ``mmap``, and gives
the free memory at the top of its heap back to the system once more than its trim threshold
(twice the mmap threshold) is free. A training step frees most of what it allocated, so the next
step touches fresh pages again: one page fault and one zeroed page per 4 KiB. The sparse
backend's step is short, so this shows: on the 4-layer d512 LM at density 0.1 (2 threads) a
static sparse step took 2,900 to 7,400 page faults and 35 to 57 ms of system time, and 200 and
11 to 19 ms with :func:`reuse_freed_memory` (0.41 s against 0.37 s a step); the dense step, a
GEMM for most of its time, did not change.

:func:`reuse_freed_memory` raises both thresholds (``mallopt``): blocks up to 32 MiB come from
the heap, and up to ``trim_threshold`` bytes of freed memory stay with the process. This is a
setting of the whole process, so the library never applies it by itself: ``alwayssparse train``
does (``train.reuse_host_memory``, on by default), and so does ``benchmarks/whole_model.py`` for
every model it compares. Elsewhere than glibc (macOS, musl) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MAX_MMAP_THRESHOLD = 32 << 20  # glibc refuses more on 64-bit systems (HEAP_MAX_SIZE / 2)

MIB = 1 << 20


def reuse_freed_memory(
    mmap_threshold: int = 32 * MIB, trim_threshold: int = 1024 * MIB, top_pad: int = 64 * MIB
) -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module docstring).

    Args:
        mmap_threshold: Blocks up to this many bytes come from the heap (at most 32 MiB).
        trim_threshold: Free memory at the top of the heap kept by the process, in bytes.
        top_pad: Extra bytes the heap grows by whenever it grows.

    Returns:
        ``True`` when glibc took the settings, ``False`` where malloc is not glibc's.

    Raises:
        ValueError: a value out of range (nothing is changed).
        OSError: glibc refused a setting.
    """
    for name, value, low, high in (
        ("mmap_threshold", mmap_threshold, 0, _MAX_MMAP_THRESHOLD),
        ("trim_threshold", trim_threshold, 0, 2**31 - 1),
        ("top_pad", top_pad, 0, 2**31 - 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{name} must be an integer in [{low}, {high}] bytes, got {value!r}")
    libc = _glibc()
    if libc is None:
        return False
    for option, value, name in (
        (_M_MMAP_THRESHOLD, mmap_threshold, "mmap_threshold"),
        (_M_TRIM_THRESHOLD, trim_threshold, "trim_threshold"),
        (_M_TOP_PAD, top_pad, "top_pad"),
    ):
        if libc.mallopt(option, value) != 1:
            raise OSError(f"glibc's mallopt refused {name}={value}")
    return True


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (whose ``mallopt`` takes these settings), else ``None``."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc
