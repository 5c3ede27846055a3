"""The C++ kernel build's lock and cache key (alwayssparse.kernels._build); nothing is compiled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from alwayssparse.kernels import _build

# Holds the build lock of argv[1] in a separate process, as a process in the middle of a build
# does: with torch's lock file created. Loads _build.py by path (fast: no torch import).
_HOLDER = """
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("_build", sys.argv[2])
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)
with build._build_lock(Path(sys.argv[1]), timeout=30):
    (Path(sys.argv[1]) / "lock").touch()
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))
    (Path(sys.argv[1]) / "lock").unlink()
"""


def _hold(build_dir: Path, seconds: float = 120) -> subprocess.Popen[str]:
    """Starts a process that holds ``build_dir``'s build lock for ``seconds``."""
    build_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", _HOLDER, str(build_dir), _build.__file__, str(seconds)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A live process holding the build lock of ``tmp_path / "build"``; killed afterwards."""
    proc = _hold(tmp_path / "build")
    yield tmp_path / "build", proc
    proc.kill()
    proc.wait()


def test_lock_of_a_killed_builder_is_taken_over(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    build_dir = tmp_path / "build"
    proc = _hold(build_dir)
    os.kill(proc.pid, signal.SIGKILL)  # killed during the build: torch's lock file stays
    proc.wait()
    assert (build_dir / "lock").exists()
    assert f"pid {proc.pid}" in (build_dir / _build._LOCK_NAME).read_text()
    start = time.monotonic()
    with _build._build_lock(build_dir, timeout=30):
        assert not (build_dir / "lock").exists()  # torch would otherwise wait for it forever
        assert f"pid {os.getpid()}" in (build_dir / _build._LOCK_NAME).read_text()
    assert time.monotonic() - start < 5
    err = capfd.readouterr().err
    assert "interrupted" in err and "waiting" not in err


def test_live_lock_times_out_with_one_message(
    holder: tuple[Path, subprocess.Popen[str]], capfd: pytest.CaptureFixture[str]
) -> None:
    build_dir, proc = holder
    start = time.monotonic()
    with (
        pytest.raises(TimeoutError, match=rf"gave up after 0.5 s waiting for pid {proc.pid} on"),
        _build._build_lock(build_dir, timeout=0.5),
    ):
        pytest.fail("the lock of a live process was taken")
    assert 0.5 <= time.monotonic() - start < 5
    err = capfd.readouterr().err
    assert err.count("waiting for") == 1 and f"pid {proc.pid}" in err
    assert (build_dir / "lock").exists()  # a live builder's lock file is left alone


def test_waiter_proceeds_when_the_holder_finishes(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    build_dir = tmp_path / "build"
    proc = _hold(build_dir, seconds=0.5)
    with _build._build_lock(build_dir, timeout=60):
        assert proc.wait(timeout=30) == 0
    assert capfd.readouterr().err.count("waiting for") == 1


@pytest.fixture
def fresh_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """get_module() as in a new process, with a cache in tmp_path and no real compilation."""
    saved = dict(_build._state)
    _build._state.update(loaded=False, module=None, error=None, build_s=None)
    monkeypatch.setenv("ALWAYSSPARSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_build, "_build_key", lambda: "test")

    def no_compile(*args: object, **kwargs: object) -> None:
        raise AssertionError("the test must not compile the extension")

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compile)
    yield
    _build._state.clear()
    _build._state.update(saved)


@pytest.mark.usefixtures("fresh_state")
@pytest.mark.parametrize("mode", ["auto", "cpp"])
def test_get_module_gives_up_on_a_held_lock(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    monkeypatch.setenv("ALWAYSSPARSE_KERNELS", mode)
    monkeypatch.setenv("ALWAYSSPARSE_BUILD_TIMEOUT", "0.3")
    proc = _hold(_build._build_directory())
    try:
        if mode == "auto":
            with pytest.warns(RuntimeWarning, match="TimeoutError.*gave up.*pure-PyTorch"):
                assert _build.get_module() is None
        else:
            with pytest.raises(RuntimeError, match="failed to build.*gave up") as info:
                _build.get_module()
            assert isinstance(info.value.__cause__, TimeoutError)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_bad_timeout_names_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("ALWAYSSPARSE_BUILD_TIMEOUT", value)
    with pytest.raises(ValueError, match="ALWAYSSPARSE_BUILD_TIMEOUT must be a positive"):
        _build._build_timeout()


def test_timeout_default_and_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALWAYSSPARSE_BUILD_TIMEOUT", raising=False)
    assert _build._build_timeout() == 600
    monkeypatch.setenv("ALWAYSSPARSE_BUILD_TIMEOUT", "2.5")
    assert _build._build_timeout() == 2.5


def test_build_key_depends_on_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_build, "_compiler_signature", lambda: "c++ 1.0")
    key = _build._build_key()
    assert _build._build_key() == key  # stable within an environment
    with monkeypatch.context() as m:  # another virtual environment's torch, same version
        m.setattr(torch, "__file__", "/elsewhere/venv/lib/torch/__init__.py")
        assert _build._build_key() != key
    with monkeypatch.context() as m:
        m.setattr(sys, "executable", "/elsewhere/venv/bin/python")
        assert _build._build_key() != key
    with monkeypatch.context() as m:
        m.setattr(_build, "_compiler_signature", lambda: "c++ 2.0")
        assert _build._build_key() != key
    with monkeypatch.context() as m:
        m.setattr(_build, "_cpu_signature", lambda: "another CPU")
        assert _build._build_key() != key
    with monkeypatch.context() as m:
        m.setattr(_build, "_CFLAGS", [*_build._CFLAGS, "-DEXTRA"])
        assert _build._build_key() != key


def test_compiler_signature_follows_cxx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert _build._compiler_signature().startswith("no-such-compiler-here\nNone\nno version")
