"""The README's "Extending alwayssparse" examples run as they are."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_blocks(heading: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


@pytest.mark.parametrize("index", range(len(_section_blocks("Extending alwayssparse"))))
def test_extending_examples_run(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    from alwayssparse.backends import BACKENDS
    from alwayssparse.methods import METHODS

    code = _section_blocks("Extending alwayssparse")[index]
    registered = (set(METHODS), set(BACKENDS))
    try:
        exec(compile(code, f"README.md (Extending, example {index + 1})", "exec"), {})
    finally:  # leave the registries as they were for the other tests
        for name in set(METHODS) - registered[0]:
            del METHODS[name]
        for name in set(BACKENDS) - registered[1]:
            del BACKENDS[name]
    if "print(" in code:
        expected = re.findall(r"print\(.*\)  # (.*)", code)
        assert capsys.readouterr().out.strip().splitlines() == expected
