"""Keep the package free of unsafe loading: weights_only checkpoints, no eval/exec/pickle on user input.

The checks read the package with the ``ast`` module, so aliases (``import pickle as p``,
``from pickle import load``) and attribute chains (``np.load``, ``torch.jit.load``) are caught too.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "aq_brevitas"
# Calls that can run code from a file or a string. ``pickle.UnpicklingError`` (an exception class,
# used to catch refusals) is fine; loading and unpickler classes are not.
FORBIDDEN = {
    "builtins.eval",
    "builtins.exec",
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "_pickle.load",
    "_pickle.loads",
    "_pickle.Unpickler",
    "dill.load",
    "dill.loads",
    "cloudpickle.load",
    "cloudpickle.loads",
    "marshal.load",
    "marshal.loads",
    "shelve.open",
    "torch.jit.load",
    "torch.package.PackageImporter",
    "joblib.load",
}


def _resolver(tree: ast.Module):
    """Map local names to the dotted names they were imported as (``np`` -> ``numpy``)."""
    names = {"eval": "builtins.eval", "exec": "builtins.exec"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[(a.asname or a.name).split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"

    def dotted(expr: ast.expr) -> str | None:
        if isinstance(expr, ast.Name):
            return names.get(expr.id, expr.id)
        if isinstance(expr, ast.Attribute):
            base = dotted(expr.value)
            return f"{base}.{expr.attr}" if base else None
        return None

    return dotted


def _calls(source: str):
    """``(call node, fully qualified callee)`` for every call in ``source``."""
    tree = ast.parse(source)
    dotted = _resolver(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, dotted(node.func) or ""


def _kw_true(node: ast.Call, name: str) -> bool:
    kw = {k.arg: k.value for k in node.keywords}
    return isinstance(kw.get(name), ast.Constant) and kw[name].value is True


def unsafe_calls(source: str) -> list[str]:
    """Every unsafe load in ``source``: forbidden callees, ``numpy.load(allow_pickle=True)``, and
    ``torch.load`` without ``weights_only=True``."""
    found = []
    for node, name in _calls(source):
        if name in FORBIDDEN:
            found.append(name)
        elif name == "numpy.load" and _kw_true(node, "allow_pickle"):
            found.append("numpy.load(allow_pickle=True)")
        elif name == "torch.load" and not _kw_true(node, "weights_only"):
            found.append("torch.load without weights_only=True")
    return found


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import pickle\npickle.load(f)", "pickle.load"),
        ("import pickle as p\np.loads(b)", "pickle.loads"),
        ("from pickle import load\nload(f)", "pickle.load"),
        ("from pickle import loads as safe\nsafe(b)", "pickle.loads"),
        ("import pickle\npickle.Unpickler(f).load()", "pickle.Unpickler"),
        ("import numpy as np\nnp.load(p, allow_pickle=True)", "numpy.load(allow_pickle=True)"),
        ("import torch\ntorch.jit.load(p)", "torch.jit.load"),
        ("from torch import jit\njit.load(p)", "torch.jit.load"),
        ("import torch\ntorch.load(p)", "torch.load without weights_only=True"),
        ("import torch\ntorch.load(p, weights_only=False)", "torch.load without weights_only=True"),
        ("from torch import load\nload(p)", "torch.load without weights_only=True"),
        ("eval(text)", "builtins.eval"),
        ("exec(code)", "builtins.exec"),
    ],
)
def test_the_checker_catches(source, expected):
    assert unsafe_calls(source) == [expected]


@pytest.mark.parametrize(
    "source",
    [
        "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
        "import numpy as np\nnp.load(p)",
        "import pickle\ntry:\n    pass\nexcept pickle.UnpicklingError:\n    pass",
        "model.eval()",  # nn.Module.eval is not builtins.eval
    ],
)
def test_the_checker_allows(source):
    assert unsafe_calls(source) == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_package_has_no_unsafe_loads(path):
    assert unsafe_calls(path.read_text()) == [], path.name


def test_every_torch_load_is_weights_only():
    loads = [n for p in PACKAGE.rglob("*.py") for n, name in _calls(p.read_text()) if name == "torch.load"]
    assert loads and all(_kw_true(n, "weights_only") for n in loads)
