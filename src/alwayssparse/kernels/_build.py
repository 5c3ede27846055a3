"""Just-in-time build of the C++ kernels (torch.utils.cpp_extension.load, needs ``ninja``).

The extension is compiled on first use into a per-user cache directory
(``$ALWAYSSPARSE_CACHE_DIR`` or ``$XDG_CACHE_HOME/alwayssparse`` or ``~/.cache/alwayssparse``),
in a sub-directory keyed by everything the shared library depends on: the sources and flags,
torch's version *and location* and the Python interpreter (so two virtual environments never
share, and rebuild, one module), the compiler (``$CXX`` or ``c++``, and its ``--version``) and the
host CPU (the code is built with ``-march=native``). Later processes only load the library.

Concurrent first uses are serialised by an advisory lock (``flock``) on a file in the build
directory that records its holder (pid and host). The kernel releases such a lock when its
holder dies, so a process killed during the build does not block later ones; the lock file
torch's own ``FileBaton`` leaves behind in that case is removed by the next builder. A process
that finds a live holder says so once on stderr and waits at most ``ALWAYSSPARSE_BUILD_TIMEOUT``
seconds (default 600), then fails with an error naming the holder; in ``auto`` mode that means
falling back to the pure-PyTorch kernels, like any other build failure.

``ALWAYSSPARSE_KERNELS`` selects the implementation: ``auto`` (default: C++, falling back to the
pure-PyTorch kernels with a one-time warning if the build fails), ``cpp`` (C++ or raise) or
``torch`` (never build).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock; torch's own lock file is all there is
    fcntl = None  # type: ignore[assignment]

_SOURCES = ("csrc/sparse_kernels.cpp",)
_CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-std=c++17"]
_LDFLAGS = ["-fopenmp"]
_LOCK_NAME = "alwayssparse-build.lock"
_TORCH_BATON = "lock"  # torch.utils.cpp_extension's FileBaton in the build directory
_TIMEOUT_ENV = "ALWAYSSPARSE_BUILD_TIMEOUT"
_DEFAULT_TIMEOUT_S = 600.0
_POLL_S = 0.1

_lock = threading.Lock()
_state: dict[str, Any] = {"loaded": False, "module": None, "error": None, "build_s": None}


def _cpu_signature() -> str:
    info = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    info += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return info


def _cache_root() -> Path:
    env = os.environ.get("ALWAYSSPARSE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "alwayssparse"


def _compiler_signature() -> str:
    """The C++ compiler torch will use (``$CXX`` or ``c++``): its path and ``--version``."""
    cxx = os.environ.get("CXX", "c++")
    try:
        result = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=60, check=False
        )
        version = result.stdout + result.stderr
    except (OSError, subprocess.SubprocessError) as exc:
        version = f"no version ({type(exc).__name__})"
    return f"{cxx}\n{shutil.which(cxx)}\n{version}"


def _build_key() -> str:
    """Hash of everything the compiled module depends on (see the module docstring)."""
    import torch

    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for source in _SOURCES:
        h.update((here / source).read_bytes())
    parts = [
        torch.__version__,
        os.path.realpath(torch.__file__),
        sys.executable,
        sys.version,
        sysconfig.get_paths().get("include", ""),
        _compiler_signature(),
        " ".join(_CFLAGS + _LDFLAGS),
        _cpu_signature(),
    ]
    for part in parts:
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _build_timeout() -> float:
    """Seconds to wait for another process's build: ``$ALWAYSSPARSE_BUILD_TIMEOUT`` or 600.

    Raises:
        ValueError: If the variable is set to something other than a positive number.
    """
    raw = os.environ.get(_TIMEOUT_ENV, "").strip()
    if not raw:
        return _DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"{_TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def _lock_owner(path: Path) -> str:
    """Who holds the build lock, as recorded in the lock file."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return text or "another process"


def _try_flock(fd: int) -> bool | None:
    """Tries to take the exclusive lock: True if taken, False if held elsewhere, None if the
    file system does not support locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # e.g. ENOLCK on some network file systems
        return None
    return True


def _wait_for_lock(fd: int, path: Path, timeout: float) -> bool:
    """Takes the lock on ``fd``, waiting for a live holder at most ``timeout`` seconds.

    Says once on stderr whom it waits for. Returns False if locks are unsupported here.

    Raises:
        TimeoutError: If the holder keeps the lock for ``timeout`` seconds.
    """
    start = time.monotonic()
    announced = False
    while True:
        taken = _try_flock(fd)
        if taken is not False:
            return bool(taken)
        waited = time.monotonic() - start
        owner = _lock_owner(path)
        if waited >= timeout:
            raise TimeoutError(
                f"alwayssparse: gave up after {timeout:g} s waiting for {owner} to finish "
                f"building the C++ kernels (lock {path}). If that process is stuck, stop it; or "
                f"raise {_TIMEOUT_ENV}, or set ALWAYSSPARSE_KERNELS=torch"
            )
        if not announced:
            print(
                f"alwayssparse: waiting for {owner} to finish building the C++ kernels in "
                f"{path.parent} (at most {timeout:g} s, {_TIMEOUT_ENV})",
                file=sys.stderr,
                flush=True,
            )
            announced = True
        time.sleep(min(_POLL_S, timeout - waited))


def _remove_stale_baton(build_dir: Path) -> None:
    """Removes torch's lock file, which only a process that died while building leaves behind
    once we hold the build lock (without this, torch would wait for it forever)."""
    baton = build_dir / _TORCH_BATON
    if baton.exists():
        print(
            f"alwayssparse: removing {baton}, left by a C++ kernel build that was interrupted",
            file=sys.stderr,
            flush=True,
        )
        baton.unlink(missing_ok=True)


@contextlib.contextmanager
def _build_lock(build_dir: Path, timeout: float) -> Iterator[None]:
    """Holds the build directory's lock (see the module docstring) for the ``with`` block.

    Raises:
        TimeoutError: If another live process holds it for ``timeout`` seconds.
    """
    if fcntl is None:
        yield
        return
    path = build_dir / _LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _wait_for_lock(fd, path, timeout):
            yield  # no locks on this file system: torch's lock file as before
            return
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            _remove_stale_baton(build_dir)
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _build_directory() -> Path:
    """This process's build directory (``<cache>/alwayssparse_kernels_<key>``)."""
    return _cache_root() / f"alwayssparse_kernels_{_build_key()}"


def _build() -> Any:
    from torch.utils.cpp_extension import load

    timeout = _build_timeout()
    build_dir = _build_directory()
    build_dir.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent
    with _build_lock(build_dir, timeout):
        return load(
            name=build_dir.name,
            sources=[str(here / s) for s in _SOURCES],
            extra_cflags=_CFLAGS,
            extra_ldflags=_LDFLAGS,
            build_directory=str(build_dir),
            verbose=bool(os.environ.get("ALWAYSSPARSE_KERNELS_VERBOSE")),
        )


def mode() -> str:
    m = os.environ.get("ALWAYSSPARSE_KERNELS", "auto").strip().lower() or "auto"
    if m not in ("auto", "cpp", "torch"):
        raise ValueError(f"ALWAYSSPARSE_KERNELS must be 'auto', 'cpp' or 'torch', got {m!r}")
    return m


def get_module() -> Any | None:
    """The compiled extension, or None when the torch fallback is in use."""
    if _state["loaded"]:
        return _state["module"]
    with _lock:
        if _state["loaded"]:
            return _state["module"]
        m = mode()
        module = None
        if m != "torch":
            t0 = time.perf_counter()
            try:
                module = _build()
                _state["build_s"] = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - any build failure -> fallback
                _state["error"] = exc
                if m == "cpp":
                    raise RuntimeError(
                        "ALWAYSSPARSE_KERNELS=cpp but the C++ sparse kernels failed to build "
                        f"({type(exc).__name__}: {exc})"
                    ) from exc
                warnings.warn(
                    "alwayssparse: could not build the C++ sparse kernels "
                    f"({type(exc).__name__}: {str(exc)[:500]}); using the slower pure-PyTorch "
                    "kernels. Install 'ninja' and a C++17 compiler to enable them, or set "
                    "ALWAYSSPARSE_KERNELS=torch to silence this warning.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _state["module"] = module
        _state["loaded"] = True
        return module


def build_seconds() -> float | None:
    """Seconds spent in the first load (compile or cache hit) of this process, if any."""
    return _state["build_s"]
