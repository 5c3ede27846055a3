"""alwayssparse.host_memory: glibc's malloc keeping freed memory for reuse."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from alwayssparse import host_memory


class _FakeLibc:
    """Records mallopt calls; answers ``result`` (1: taken, 0: refused)."""

    def __init__(self, result: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.result = result

    def mallopt(self, option: int, value: int) -> int:
        self.calls.append((option, value))
        return self.result


def test_settings_reach_mallopt(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = _FakeLibc()
    monkeypatch.setattr(host_memory, "_glibc", lambda: libc)
    assert host_memory.reuse_freed_memory(mmap_threshold=1 << 20, trim_threshold=5, top_pad=7)
    assert libc.calls == [(-3, 1 << 20), (-1, 5), (-2, 7)]  # M_MMAP_THRESHOLD, TRIM, TOP_PAD


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"mmap_threshold": (32 << 20) + 1}, "mmap_threshold"),
        ({"trim_threshold": -1}, "trim_threshold"),
        ({"top_pad": 2**31}, "top_pad"),
        ({"top_pad": 1.5}, "top_pad"),
        ({"mmap_threshold": True}, "mmap_threshold"),
    ],
)
def test_bad_values_are_refused_before_anything_is_set(
    arguments: dict[str, object], field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    libc = _FakeLibc()
    monkeypatch.setattr(host_memory, "_glibc", lambda: libc)
    with pytest.raises(ValueError, match=field):
        host_memory.reuse_freed_memory(**arguments)  # type: ignore[arg-type]
    assert libc.calls == []


def test_a_refused_setting_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_memory, "_glibc", lambda: _FakeLibc(result=0))
    with pytest.raises(OSError, match="refused mmap_threshold"):
        host_memory.reuse_freed_memory()


def test_nothing_happens_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert host_memory._glibc() is None
    assert host_memory.reuse_freed_memory() is False


_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    from alwayssparse.host_memory import reuse_freed_memory
    class Info(ctypes.Structure):  # glibc's struct mallinfo2
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    if sys.argv[1] == "reuse":
        assert reuse_freed_memory()
    before = libc.mallinfo2().hblks
    block = libc.malloc(20 << 20)
    mapped = libc.mallinfo2().hblks - before
    libc.free(block)
    print(mapped, libc.mallinfo2().keepcost)
    """
)


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc"
)
def test_blocks_come_from_the_heap_and_stay_after_free() -> None:
    """A 20 MiB block: glibc maps it on its own by default (and unmaps it when freed, so the
    next one is faulted in again); with reuse it comes from the heap and stays there when freed
    (glibc's own counters, ``mallinfo2``, in a fresh process for each setting)."""
    version = tuple(int(p) for p in platform.libc_ver()[1].split(".")[:2])
    if version < (2, 33):
        pytest.skip("mallinfo2 needs glibc 2.33")
    probes = {}
    for mode in ("default", "reuse"):
        result = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True,
                                text=True, check=True, timeout=120)  # fmt: skip
        mapped, kept = (int(v) for v in result.stdout.split())
        probes[mode] = mapped, kept
    assert probes["default"][0] == 1  # a mapping of its own
    assert probes["reuse"][0] == 0  # from the heap
    assert probes["reuse"][1] >= 20 << 20  # freed, and kept at the top of the heap
