"""Keep the package free of unsafe loading: weights_only checkpoints, no eval/exec/pickle on user input."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "aq_brevitas"


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "<expr>") if isinstance(f, ast.Attribute) else ""
            yield node, owner, name


def test_no_eval_exec_or_pickle_loads():
    for path in PACKAGE.glob("*.py"):
        for _node, owner, name in _calls(ast.parse(path.read_text())):
            assert name not in ("eval", "exec") or owner not in ("", "builtins"), f"{path.name}: {name}()"
            assert not (owner == "pickle" and name in ("load", "loads")), f"{path.name}: pickle.{name}"


def test_every_torch_load_is_weights_only():
    found = 0
    for path in PACKAGE.glob("*.py"):
        for node, owner, name in _calls(ast.parse(path.read_text())):
            if owner == "torch" and name == "load":
                found += 1
                kw = {k.arg: k.value for k in node.keywords}
                assert (
                    isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                ), path.name
    assert found >= 1
