"""Every ```python block in docs/*.md and README.md runs, in order, one namespace per file, and every
``print(x)  # VALUE`` line whose comment starts with a literal (``# True``, ``# 3.0: ...``) prints it."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
# print(EXPR)  # LITERAL   or   # LITERAL: explanation   (a comment like "# 3 bits -> ..." is prose)
RESULT = re.compile(
    r"^(?P<indent>\s*)print\((?P<expr>.*)\)\s*#\s*(?P<value>True|False|-?\d+(?:\.\d+)?)\s*(?::.*)?$"
)


def with_result_checks(block: str) -> tuple[str, int]:
    """``block`` with each result comment turned into an assertion, and how many there were."""
    lines, checks = [], 0
    for line in block.splitlines():
        m = RESULT.match(line)
        if m:
            checks += 1
            i, expr, value = m["indent"], m["expr"], m["value"]
            line = f"{i}_v = {expr}; print(_v); assert _v == {value}, f'documented {value}, got {{_v!r}}: {expr}'"
        lines.append(line)
    return "\n".join(lines) + "\n", checks


def test_result_comments_become_assertions():
    code, n = with_result_checks("x = 2\nprint(x + 1)   # 3: three\nprint(x)  # 3 bits -> prose\n")
    assert n == 1
    exec(compile(code, "t", "exec"), {})  # noqa: S102
    with pytest.raises(AssertionError, match="documented 3, got 2"):
        exec(compile(with_result_checks("print(2)  # 3")[0], "t", "exec"), {})  # noqa: S102


def test_docs_have_result_comments_to_check():
    total = sum(with_result_checks(b)[1] for d in DOCS for b in BLOCK.findall(d.read_text()))
    assert total >= 2


@pytest.mark.parametrize("doc", [d for d in DOCS if BLOCK.search(d.read_text())], ids=lambda p: p.name)
def test_doc_examples_run(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__doc_example__"}
    for i, block in enumerate(BLOCK.findall(doc.read_text())):
        code, _ = with_result_checks(block)
        exec(compile(code, f"{doc.name}[block {i}]", "exec"), namespace)  # noqa: S102 -- our own docs
