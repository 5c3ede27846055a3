"""Strict JSON writing (alwayssparse.jsonio)."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import pytest

from alwayssparse import jsonio
from alwayssparse.jsonio import dumps_strict, write_json_atomic


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_raises_with_the_key_path(bad: float) -> None:
    obj = {"final": {"valid": {"loss": bad}}, "curve": [1.0, 2.0]}
    with pytest.raises(ValueError, match=r"final\.valid\.loss is (nan|inf|-inf).*NaN"):
        dumps_strict(obj)
    with pytest.raises(ValueError, match=r"curve\[2\]"):
        dumps_strict({"curve": (1.0, 2.0, bad)})
    with pytest.raises(ValueError, match=r"^\[1\]"):
        dumps_strict([0.5, bad])


def test_nan_to_null_writes_null() -> None:
    text = dumps_strict({"a": [math.nan, 1.5], "b": math.inf}, nan_to_null=True)
    assert json.loads(text) == {"a": [None, 1.5], "b": None}


def test_output_is_standard_json() -> None:
    obj = {"b": 1, "a": [True, None, "x", 2.5]}
    text = dumps_strict(obj, sort_keys=True)
    assert text == json.dumps(obj, sort_keys=True)
    assert dumps_strict({"s": "NaN"}) == '{"s": "NaN"}'  # a string is not a number


def test_write_json_atomic_writes_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    write_json_atomic({"loss": 1.0}, path)
    write_json_atomic({"loss": 0.5}, path)
    assert json.loads(path.read_text()) == {"loss": 0.5}
    assert path.read_text().endswith("\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_non_finite_leaves_the_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    write_json_atomic({"loss": 1.0}, path)
    with pytest.raises(ValueError, match=r"summary\.json: loss is nan"):
        write_json_atomic({"loss": math.nan}, path)
    assert json.loads(path.read_text()) == {"loss": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


@pytest.mark.parametrize("fail_in", ["fsync", "replace"])
def test_failed_write_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_in: str
) -> None:
    path = tmp_path / "summary.json"
    write_json_atomic({"loss": 1.0}, path)

    def full_disk(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jsonio.os, fail_in, full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_json_atomic({"loss": 0.5, "long": "x" * 10_000}, path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"loss": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_interrupt_during_write_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "summary.json"

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(jsonio.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic({"loss": 0.5}, path)
    assert list(tmp_path.iterdir()) == []


def test_unserialisable_value_raises_type_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_json_atomic({"x": object()}, tmp_path / "x.json")
    assert list(tmp_path.iterdir()) == []
    assert not os.path.exists(tmp_path / "x.json")
