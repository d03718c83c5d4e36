"""Every ```python block in docs/*.md and README.md runs, in order, one namespace per file, and every
``print(x)  # VALUE`` line whose comment starts with a literal (``# True``, ``# 3.0: ...``) prints it.
Every ``>>>`` docstring example in the aq_brevitas package runs too, the core public functions have one,
and the architecture diagram in docs/concepts.md agrees with the package's imports."""

import ast
import doctest
import importlib
import importlib.util
import inspect
import io
import pkgutil
import re
from pathlib import Path

import pytest
import torch

import aq_brevitas

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


# Docstring examples: every ``>>>`` example in the docstrings of aq_brevitas's modules (subpackages
# included) runs under the stdlib doctest, one case per module; the core public names must have one.
DOCTEST_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
CORE_NAMES = (
    "search_policy",
    "quantize",
    "apply_policy",
    "lipschitz_scores",
    "evaluate_robustness",
    "adversarial_finetune",
    "export_qonnx",
    "run",
    "LayerwisePolicy",
)


def modules_with_examples() -> list[str]:
    """Names of the package's modules whose source has a ``>>>`` line, found without importing them
    (only packages are imported, to walk into them), so collection does not depend on heavy imports."""
    names = []
    for info in pkgutil.walk_packages(aq_brevitas.__path__, "aq_brevitas."):
        origin = importlib.util.find_spec(info.name).origin
        if origin and re.search(r"^\s*>>> ", Path(origin).read_text(), re.M):
            names.append(info.name)
    return sorted(names)


EXAMPLE_MODULES = modules_with_examples()


def test_docstring_examples_are_collected():
    assert "aq_brevitas.evaluate.study" in EXAMPLE_MODULES  # the walk sees the package's modules


@pytest.mark.parametrize("module_name", EXAMPLE_MODULES)
def test_docstring_examples_run(module_name, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
    module = importlib.import_module(module_name)
    tests = [t for t in doctest.DocTestFinder().find(module) if t.examples]
    assert tests, f"{module_name} has '>>>' lines but no docstring example doctest can find"
    runner = doctest.DocTestRunner(optionflags=DOCTEST_FLAGS)
    out = io.StringIO()
    for test in tests:
        runner.run(test, out=out.write)
    assert runner.failures == 0, out.getvalue()


@pytest.mark.parametrize("name", CORE_NAMES)
def test_core_public_name_has_an_example(name):
    has_example = ">>>" in (inspect.getdoc(getattr(aq_brevitas, name)) or "")
    assert has_example, f"aq_brevitas.{name} has no runnable '>>>' example in its docstring"


# The architecture diagram in docs/concepts.md is true of the code: every module of the package is on it
# once (a subpackage as ``name/``), and a module imports only modules on lower lines of the diagram or to
# its left on its own line. Imports inside functions count; ``if TYPE_CHECKING:`` ones do not.
PACKAGE = ROOT / "aq_brevitas"
DIAGRAM = re.compile(r"^## Architecture\n.*?```text\n(.*?)```", re.S | re.M)
MODULE_TOKEN = re.compile(r"(?<![\w.])([a-z_][a-z0-9_]*(?:\.py|/))(?![\w])")


def diagram_positions() -> dict[str, tuple[int, int]]:
    """``{module: (line, column)}`` for the modules drawn in the diagram, ``search/`` for a subpackage."""
    block = DIAGRAM.search((ROOT / "docs" / "concepts.md").read_text())
    assert block, "docs/concepts.md has no ```text diagram under '## Architecture'"
    positions: dict[str, tuple[int, int]] = {}
    for line, text in enumerate(block[1].splitlines()):
        for col, name in enumerate(MODULE_TOKEN.findall(text)):
            assert name not in positions, f"{name} is drawn twice"
            positions[name] = (line, col)
    return positions


def _imported_names(node: ast.AST, depth: int) -> list[str]:
    """Top-level names in ``aq_brevitas`` that an import statement in a module ``depth`` folders below
    the package refers to (``[]`` for other packages, and for imports inside the same subpackage)."""
    if isinstance(node, ast.ImportFrom) and node.level:
        if node.level <= depth:  # a sibling inside the same subpackage
            return []
        return [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aq_brevitas."):
        return [node.module.split(".")[1]]
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1] for a in node.names if a.name.startswith("aq_brevitas.")]
    return []


def package_imports() -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` for every module but the package's ``__init__``,
    in the diagram's names (``search/`` stands for every module of that subpackage)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if parts == ("__init__.py",):
            continue
        unit = parts[0] + "/" if len(parts) > 1 else parts[0]
        tree = ast.parse(path.read_text())
        annotations_only = {
            id(n)
            for t in ast.walk(tree)
            if isinstance(t, ast.If) and "TYPE_CHECKING" in ast.unparse(t.test)
            for n in (m for statement in t.body for m in ast.walk(statement))
        }
        targets = graph.setdefault(unit, set())
        for node in ast.walk(tree):
            for name in [] if id(node) in annotations_only else _imported_names(node, len(parts) - 1):
                target = name + "/" if (PACKAGE / name / "__init__.py").is_file() else name + ".py"
                if target != unit and (PACKAGE / target).exists():  # not a name like __version__
                    targets.add(target)
    return graph


def test_architecture_diagram_matches_the_imports():
    drawn, graph = diagram_positions(), package_imports()
    missing, absent = sorted(set(graph) - set(drawn)), sorted(set(drawn) - set(graph))
    assert not missing, "modules missing from the diagram in docs/concepts.md"
    assert not absent, "the diagram in docs/concepts.md names modules that do not exist"
    upward = [
        f"{a} imports {b}"
        for a, targets in sorted(graph.items())
        for b in sorted(targets)
        if not (drawn[b][0] > drawn[a][0] or (drawn[b][0] == drawn[a][0] and drawn[b][1] < drawn[a][1]))
    ]
    assert not upward, "imports against the diagram's direction (docs/concepts.md): " + "; ".join(upward)
