"""Generated reference pages, so the docs cannot drift from the code.

``python tools/reference.py`` rewrites docs/cli.md (from the argparse definitions), docs/api.md
(from the public API's signatures and docstrings) and docs/troubleshooting.md (every warning and
error the package raises, read from the source of every module in ``aq_brevitas`` and its
subpackages, with its fix). tests/test_reference.py checks the files are current. A development
tool, not part of the installed package: it imports ``aq_brevitas`` like any user would.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "aq_brevitas"
DOCS = ROOT / "docs"
COMMAND = "python tools/reference.py"


def cli_reference() -> str:
    import os

    from aq_brevitas.cli import build_parser

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
        f"Generated from the argparse definitions by `{COMMAND}`.",
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
        f"`{COMMAND}`.",
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
    if isinstance(node, ast.IfExp):  # "a" if cond else "": show the text that can appear
        return _template(node.body, constants)
    return None


def _local_texts(tree: ast.Module, constants: dict[str, str]) -> dict[int, dict[str, str]]:
    """For each ``raise`` inside a function: module constants plus that function's ``name = "text"``
    assignments (innermost function wins), so ``raise XError(msg, fix)`` with ``fix = f"..."`` resolves."""
    scopes: dict[int, dict[str, str]] = {}
    for fn in ast.walk(tree):  # breadth first: outer functions before the ones nested in them
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        local = dict(constants)
        for n in ast.walk(fn):
            if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name):
                text = _template(n.value, local)
                if text is not None:
                    local[n.targets[0].id] = text
        for n in ast.walk(fn):
            if isinstance(n, ast.Raise):
                scopes[id(n)] = local
    return scopes


def _module_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "text"`` assignments, so messages kept in constants can be resolved."""
    return {
        t.id: n.value.value
        for n in tree.body
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
        for t in n.targets
        if isinstance(t, ast.Name)
    }


# Fixes for the package's warnings whose message does not carry its own `` -- fix: ``, keyed by the
# start of the message (not by module, so a warning keeps its fix when its code moves).
# tests/test_bad_inputs.py fails if a warning has neither.
WARNING_FIXES = {
    "torch.ao has no observer": "use scaling max for those layers when deploying through torch.ao, "
    "or deploy through Brevitas/QONNX, which has the exact rule",
    "layers never called in forward": "delete layers forward never calls; the search gives them no spec, "
    "so quantize leaves them float",
    "to_qconfig_mapping: torch.ao FX quantizes": "use aq_brevitas.ao.prepare_fx_model, which "
    "quantizes each layer's input with its act_bit_width",
    "search_policy ran without val_data": "pass held-out training images as val_data "
    "(the CLI does unless --val-images 0)",
    "model is not a chain": "use the jacobian estimate (the default: --estimate jacobian)",
}


def package_sources() -> list[tuple[str, ast.Module]]:
    """``(module, syntax tree)`` for every module of ``aq_brevitas`` and its subpackages, sorted by
    module name: ``"ao"``, ``"search.mckp"``, ``"search"`` for ``search/__init__.py``."""
    modules = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if len(parts) > 1 and parts[-1] == "__init__":
            parts = parts[:-1]
        modules.append((".".join(parts), ast.parse(path.read_text())))
    return sorted(modules, key=lambda m: m[0])


def warning_catalogue() -> list[tuple[str, str, str]]:
    """``(module, message template, fix)`` for every warning the package issues: its calls of
    :func:`aq_brevitas.errors.warn` (the one way it warns; ``tests/test_layout.py`` keeps it so)."""
    rows = []
    for module, tree in package_sources():
        constants = _module_constants(tree)
        for node in ast.walk(tree):
            f = node.func if isinstance(node, ast.Call) else None
            if not (isinstance(f, ast.Name) and f.id == "warn"):
                continue
            message = _template(node.args[0], constants) if node.args else None
            if not message:
                continue
            message, _, fix = message.partition(" -- fix: ")
            if not fix:
                fix = next((v for start, v in WARNING_FIXES.items() if message.startswith(start)), "")
            rows.append((module, message, fix))
    return rows


def interrupt_message() -> tuple[str, int]:
    """The line and exit code the CLI gives on Ctrl-C, read from the ``except KeyboardInterrupt`` in cli.main."""
    tree = ast.parse((PACKAGE / "cli" / "__init__.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and getattr(node.type, "id", None) == "KeyboardInterrupt":
            texts = [
                n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            ]
            codes = [
                n.value.value
                for n in ast.walk(node)
                if isinstance(n, ast.Return) and isinstance(n.value, ast.Constant)
            ]
            return texts[0], codes[0]
    raise LookupError("cli.main has no KeyboardInterrupt handler")


# Two typical command-line slips; their output is produced by argparse itself when the page is built.
USAGE_EXAMPLES = (
    ["quantize", "--model", "cnn-pgd"],
    ["export", "--model", "q.pt", "--out", "q.onnx", "--format", "onnx"],
)


def usage_error(argv: list[str]) -> str:
    """What argparse prints for ``aq-brevitas ARGV`` when ARGV is not a valid command line."""
    import contextlib
    import io
    import os

    from aq_brevitas.cli import build_parser

    err = io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
            build_parser().parse_args(argv)
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return err.getvalue().rstrip()


def error_catalogue() -> list[tuple[str, str, str, str]]:
    """``(module, error class, problem template, fix)`` for every ``raise XError(problem, fix)`` in the package."""
    from aq_brevitas import errors

    names = {n for n, o in vars(errors).items() if inspect.isclass(o) and issubclass(o, errors.AqError)}
    rows = []
    for module, tree in package_sources():
        constants = _module_constants(tree)
        scopes = _local_texts(tree, constants)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Raise)
                and isinstance(node.exc, ast.Call)
                and getattr(node.exc.func, "id", None) in names
            ):
                args = node.exc.args
                texts = scopes.get(id(node), constants)
                problem = _template(args[0], texts) if args else None
                fix = _template(args[1], texts) if len(args) > 1 else ""
                if problem:
                    rows.append((module, node.exc.func.id, problem, fix or ""))
    return rows


def troubleshooting() -> str:
    parts = [
        "# Troubleshooting",
        "",
        "Every error aq-brevitas raises is one line: *what is wrong* `-- fix:` *what to do*. The CLI prints it as",
        "`aq-brevitas: error: …` and exits with code 2 (130 on Ctrl-C); `aq-brevitas --debug COMMAND …` shows the",
        f"traceback instead. This list is generated from the source (`{COMMAND}`); `…` stands",
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
        "## Command-line usage errors",
        "",
        "A command line argparse cannot read (a missing required option, an unknown option, a value that is not",
        "one of the choices or not a number) is refused before anything runs, with exit code 2: argparse prints",
        "the command's usage line and one `error:` line; an unknown option is one line, `aq-brevitas: error:",
        "aq-brevitas COMMAND does not take OPTION -- fix: see `aq-brevitas COMMAND --help``. For example:",
        "",
    ]
    for argv in USAGE_EXAMPLES:
        parts += ["```text", "$ aq-brevitas " + " ".join(argv), usage_error(argv), "```", ""]
    line, code = interrupt_message()
    parts += [
        "## Ctrl-C",
        "",
        f"An interrupted command prints `{line}` and exits with code {code}. Every output is written to a",
        "temporary file and renamed into place, so files from finished steps are complete and no partial",
        "file is left under a final name. `train` and `finetune` keep `<out>.train-state.pt`: rerun the same",
        "command with `--resume` to continue; `run` resumes by itself (it skips finished stages).",
        "",
        "## Warnings",
        "",
        "Printed as `UserWarning: …`; the run goes on.",
        "",
        "| where | message | fix |",
        "|---|---|---|",
    ]
    for module, message, fix in warning_catalogue():
        parts.append(f"| `{module}` | {_cell(message)} | {_cell(fix)} |")
    parts += [
        "",
        "## Errors",
        "",
        "| where | error | message | fix |",
        "|---|---|---|---|",
    ]
    for module, cls, problem, fix in error_catalogue():
        parts.append(f"| `{module}` | `{cls}` | {_cell(problem)} | {fix.replace('|', chr(92) + '|')} |")
    return "\n".join(parts) + "\n"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


PAGES = {"cli.md": cli_reference, "api.md": api_reference, "troubleshooting.md": troubleshooting}


def main() -> None:
    from aq_brevitas.storage import atomic_write_text

    for name, fn in PAGES.items():
        atomic_write_text(DOCS / name, fn() + ("" if fn is troubleshooting else "\n"))
        print(f"wrote docs/{name}")


if __name__ == "__main__":
    main()
