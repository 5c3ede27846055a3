"""Just-in-time build of the C++ kernels (torch.utils.cpp_extension.load, needs ``ninja``).

The extension is compiled on first use into a per-user cache directory
(``$ALWAYSSPARSE_CACHE_DIR`` or ``$XDG_CACHE_HOME/alwayssparse`` or ``~/.cache/alwayssparse``),
in a sub-directory keyed by the source, torch/python versions and the host CPU (the code is
built with ``-march=native``), so later processes only load the shared library.

``ALWAYSSPARSE_KERNELS`` selects the implementation: ``auto`` (default: C++, falling back to the
pure-PyTorch kernels with a one-time warning if the build fails), ``cpp`` (C++ or raise) or
``torch`` (never build).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

_SOURCES = ("csrc/sparse_kernels.cpp",)
_CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-std=c++17"]
_LDFLAGS = ["-fopenmp"]

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


def _build() -> Any:
    import torch
    from torch.utils.cpp_extension import load

    here = Path(__file__).resolve().parent
    sources = [here / s for s in _SOURCES]
    h = hashlib.sha256()
    for s in sources:
        h.update(s.read_bytes())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    h.update(_cpu_signature().encode())
    tag = h.hexdigest()[:16]
    name = f"alwayssparse_kernels_{tag}"
    build_dir = _cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(
        name=name,
        sources=[str(s) for s in sources],
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
