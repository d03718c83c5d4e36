"""Generated reference pages, so the docs cannot drift from the code.

``python -m aq_brevitas.reference`` rewrites docs/cli.md (from the argparse definitions),
docs/api.md (from the public API's signatures and docstrings) and docs/troubleshooting.md (every
error the package raises, read from the source, with its fix). A test checks the files are current.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

PACKAGE = Path(__file__).parent
DOCS = PACKAGE.parent / "docs"


def cli_reference() -> str:
    import os

    from .cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps help to the terminal width: fix it for reproducible docs
    try:
        return _cli_reference(build_parser())
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _cli_reference(parser) -> str:
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    parts = [
        "# CLI reference",
        "",
        "Generated from the argparse definitions by `python -m aq_brevitas.reference`.",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
        "",
    ]
    for name, p in sub.choices.items():
        parts += [f"## `aq-brevitas {name}`", "", "```text", p.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def api_reference() -> str:
    import aq_brevitas

    parts = [
        "# API reference",
        "",
        "The public API (`aq_brevitas.__all__`), generated from signatures and docstrings by",
        "`python -m aq_brevitas.reference`.",
        "",
    ]
    for name in aq_brevitas.__all__:
        obj = getattr(aq_brevitas, name)
        try:
            sig = str(inspect.signature(obj))
        except (TypeError, ValueError):
            sig = ""
        kind = "class" if inspect.isclass(obj) else "function"
        doc = inspect.getdoc(obj) or ""
        parts += [
            f"## `{name}`",
            "",
            f"{kind} in `{obj.__module__}`",
            "",
            "```text",
            f"{name}{sig}",
            "```",
            "",
            doc,
            "",
        ]
    return "\n".join(parts)


def _template(node: ast.expr, constants: dict[str, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values)
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _template(node.left, constants), _template(node.right, constants)
        return None if left is None or right is None else left + right
    return None


def error_catalogue() -> list[tuple[str, str, str, str]]:
    """``(module, error class, problem template, fix)`` for every ``raise XError(problem, fix)`` in the package."""
    from . import errors

    names = {n for n, o in vars(errors).items() if inspect.isclass(o) and issubclass(o, errors.AqError)}
    rows = []
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        constants = {
            t.id: n.value.value
            for n in tree.body
            if isinstance(n, ast.Assign)
            and isinstance(n.value, ast.Constant)
            and isinstance(n.value.value, str)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Raise)
                and isinstance(node.exc, ast.Call)
                and getattr(node.exc.func, "id", None) in names
            ):
                args = node.exc.args
                problem = _template(args[0], constants) if args else None
                fix = _template(args[1], constants) if len(args) > 1 else ""
                if problem:
                    rows.append((path.stem, node.exc.func.id, problem, fix or ""))
    return rows


def troubleshooting() -> str:
    parts = [
        "# Troubleshooting",
        "",
        "Every error aq-brevitas raises is one line: *what is wrong* `-- fix:` *what to do*. The CLI prints it as",
        "`aq-brevitas: error: …` and exits with code 2 (130 on Ctrl-C); `aq-brevitas --debug COMMAND …` shows the",
        "traceback instead. This list is generated from the source (`python -m aq_brevitas.reference`); `…` stands",
        "for the value in your run.",
        "",
        "## Known messages that are not errors",
        "",
        "* `UserWarning: fast_hadamard_transform package not found` and `DeprecationWarning: brevitas.fx is deprecated`:",
        "  printed by Brevitas 0.13.4 on import; harmless (the CLI hides exactly these two).",
        '* `DeprecationWarning` from torch.ao FX ("migrate to torchao pt2e"): torch 2.13 emits it on every FX call.',
        "* `Failed to load .../torchao/_C_*.so`: torchao's optional GPU kernels; harmless on CPU.",
        "* Slow CPU training/attacks after a while: denormal weights. `torch.set_flush_denormal(True)` (the CLI does this).",
        "",
        "## Errors",
        "",
        "| where | error | message | fix |",
        "|---|---|---|---|",
    ]
    for module, cls, problem, fix in error_catalogue():
        cell = problem.replace("|", "\\|").replace("\n", " ")
        parts.append(f"| `{module}` | `{cls}` | {cell} | {fix.replace('|', chr(92) + '|')} |")
    return "\n".join(parts) + "\n"


PAGES = {"cli.md": cli_reference, "api.md": api_reference, "troubleshooting.md": troubleshooting}


def main() -> None:
    from .storage import atomic_write_text

    for name, fn in PAGES.items():
        atomic_write_text(DOCS / name, fn() + ("" if fn is troubleshooting else "\n"))
        print(f"wrote docs/{name}")


if __name__ == "__main__":
    main()
