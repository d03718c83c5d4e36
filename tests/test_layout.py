"""The house shape holds: small modules, short functions, no keyword walls, no private cross-imports."""

import ast

from conftest import REPO

PACKAGE = REPO / "aq_brevitas"
MAX_MODULE_LINES = 600
LONG_FUNCTION = 80  # lines; at most MAX_LONG_FUNCTIONS may exceed it
MAX_LONG_FUNCTIONS = 2
MAX_FUNCTION_LINES = 120
MAX_PUBLIC_PARAMS = 10


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _functions():
    for path in _modules():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(REPO), node


def _params(fn: ast.FunctionDef) -> int:
    a = fn.args
    names = [*a.posonlyargs, *a.args, *a.kwonlyargs]
    return len([p for p in names if p.arg not in ("self", "cls")])


def test_no_module_over_the_limit():
    big = {
        str(p.relative_to(REPO)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_functions_are_short():
    lengths = {f"{p}:{fn.name}": fn.end_lineno - fn.lineno + 1 for p, fn in _functions()}
    long = {k: v for k, v in lengths.items() if v > LONG_FUNCTION}
    assert len(long) <= MAX_LONG_FUNCTIONS, (
        f"more than {MAX_LONG_FUNCTIONS} functions over {LONG_FUNCTION} lines: {long}"
    )
    too_long = {k: v for k, v in long.items() if v > MAX_FUNCTION_LINES}
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"


def test_public_functions_take_few_parameters():
    walls = {
        f"{p}:{fn.name}": _params(fn)
        for p, fn in _functions()
        if not fn.name.startswith("_") and _params(fn) > MAX_PUBLIC_PARAMS
    }
    assert not walls, f"public functions with more than {MAX_PUBLIC_PARAMS} parameters: {walls}"


def test_no_module_imports_another_modules_private_name():
    bad = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (
                node.level or (node.module or "").startswith("aq_brevitas")
            ):
                bad += [
                    f"{path.relative_to(REPO)}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_")
                ]
    assert not bad, f"private names imported across modules: {bad}"
