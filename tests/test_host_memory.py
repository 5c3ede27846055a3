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


_FAULTS = textwrap.dedent(
    """
    import resource, sys, torch
    from alwayssparse.host_memory import reuse_freed_memory
    if sys.argv[1] == "reuse":
        assert reuse_freed_memory()
    torch.empty(1 << 19).fill_(1.0)  # 2 MiB, freed: glibc's mmap threshold rises to 2 MiB
    def step():  # 64 MiB in 1 MiB tensors from the heap, all freed (as a training step does)
        tensors = [torch.empty(1 << 18).fill_(1.0) for _ in range(64)]
        del tensors
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
    """
)


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc"
)
def test_reused_memory_is_not_faulted_in_again() -> None:
    """By default glibc gives the freed 64 MiB back at every step and the next step faults
    16 Ki pages in again; with reuse it keeps them (a fresh process for each setting)."""
    faults = {}
    for mode in ("default", "reuse"):
        result = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True,
                                text=True, check=True, timeout=120)  # fmt: skip
        faults[mode] = float(result.stdout.strip())
    assert faults["default"] > 4000  # most of the 16 Ki pages of a step
    assert faults["reuse"] < faults["default"] / 3, faults
