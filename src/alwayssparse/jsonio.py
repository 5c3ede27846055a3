"""Strict JSON: never NaN or Infinity, and files replaced atomically.

Python's ``json`` writes ``NaN``, ``Infinity`` and ``-Infinity`` by default, which are not JSON:
strict parsers (``jq``, JavaScript's ``JSON.parse``, most other languages) reject the whole file.
:func:`dumps_strict` refuses them. By default it raises a ``ValueError`` that names the key path
of the offending value (e.g. ``final.valid.loss``), which is the right behaviour for summaries
and configs, where a non-finite number is a bug to report rather than hide. With
``nan_to_null=True`` they are written as ``null`` instead, for logs that must record a diverged
value without failing.

:func:`write_json_atomic` writes to a temporary file in the destination's directory and renames
it over the destination (``os.replace``), so a reader sees either the old file or the new one,
never a partial one; on any failure (a full disk, an interrupt) the temporary file is removed
and the old file is left as it was.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "dumps_strict", "write_json_atomic", "write_text_atomic"]


def _child_path(parent: str, key: object) -> str:
    """The key path of ``parent[key]``: ``a.b`` for dict keys, ``a[3]`` for list indices."""
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else str(key)


def _replace_non_finite(obj: Any, path: str, nan_to_null: bool) -> Any:
    """``obj`` with non-finite floats replaced by None, or ValueError naming the first one.

    Containers are rebuilt only along the way (dicts, lists, tuples); other values are returned
    as they are for ``json`` to serialise or reject.
    """
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        if nan_to_null:
            return None
        raise ValueError(
            f"{path or 'the value'} is {obj!r}, which JSON cannot represent (no NaN or "
            "Infinity); check where it comes from, or write non-finite values as null"
        )
    if isinstance(obj, dict):
        for key in obj:
            _replace_non_finite(key, _child_path(path, f"<key {key!r}>"), nan_to_null=False)
        return {
            k: _replace_non_finite(v, _child_path(path, k), nan_to_null) for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [
            _replace_non_finite(v, _child_path(path, i), nan_to_null) for i, v in enumerate(obj)
        ]
    return obj


def dumps_strict(
    obj: Any, *, indent: int | None = None, sort_keys: bool = False, nan_to_null: bool = False
) -> str:
    """Serialises ``obj`` to standard JSON (no ``NaN`` / ``Infinity``).

    Args:
        obj: Dicts, lists, tuples, strings, numbers, booleans and None.
        indent: As :func:`json.dumps`.
        sort_keys: As :func:`json.dumps`.
        nan_to_null: Write non-finite floats as ``null`` instead of raising.

    Returns:
        The JSON text.

    Raises:
        ValueError: If ``obj`` holds a non-finite float (and ``nan_to_null`` is false); the
            message names its key path. A non-finite float used as a dict key always raises.
        TypeError: If ``obj`` holds a value JSON cannot represent (e.g. a tensor).
    """
    clean = _replace_non_finite(obj, "", nan_to_null)
    return json.dumps(clean, indent=indent, sort_keys=sort_keys, allow_nan=False)


def _fsync_directory(directory: Path) -> None:
    """Flushes a directory entry (the rename) to disk where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows cannot open directories; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(
    obj: Any,
    path: str | os.PathLike[str],
    *,
    indent: int | None = 2,
    sort_keys: bool = False,
    nan_to_null: bool = False,
) -> None:
    """Writes ``obj`` as strict JSON (see :func:`dumps_strict`) to ``path``, atomically.

    The text is built first, so a value that cannot be written leaves the file untouched. It
    is then written to a temporary file next to ``path``, flushed to disk and renamed over
    ``path``. On any failure the temporary file is removed and ``path`` keeps its old content.

    Args:
        obj: The value to write.
        path: Destination file; its directory must exist.
        indent: As :func:`json.dumps` (2 by default, for files people read).
        sort_keys: As :func:`json.dumps`.
        nan_to_null: Write non-finite floats as ``null`` instead of raising.

    Raises:
        ValueError: If ``obj`` holds a non-finite float; the message names the file and the
            key path.
        TypeError: If ``obj`` holds a value JSON cannot represent.
        OSError: If the file cannot be written (e.g. no space left on the device).
    """
    path = Path(path)
    try:
        text = dumps_strict(obj, indent=indent, sort_keys=sort_keys, nan_to_null=nan_to_null)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    write_text_atomic(path, text + "\n")


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`."""
    atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write a file through a temporary file in its directory, flushed and renamed over
    ``path``: readers see the old file or the new one, never half of one. On any failure the
    temporary file is removed and ``path`` keeps its old content; an ``OSError`` (also a full
    disk that ``torch.save`` reports as ``RuntimeError``) is raised as one ``OSError`` that
    names ``path``."""
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise OSError(error.errno, f"cannot write {path}: {error.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        Path(tmp_name).unlink(missing_ok=True)
        message = str(error)
        if isinstance(error, OSError) or (
            isinstance(error, RuntimeError) and ("iostream" in message or "Stream" in message)
        ):
            reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
            raise OSError(f"cannot write {path} (disk full or not writable?): {reason}") from None
        raise
    _fsync_directory(path.parent)
