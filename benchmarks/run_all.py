"""`make bench`: run every benchmark, save its JSON under benchmarks/results/, regenerate docs/benchmarks.md.

Usage: python benchmarks/run_all.py [name ...]   (default: all; `--render` only re-renders the doc)
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
BENCHMARKS = ["finetune_speed", "export_parity", "ao_agreement", "compare_methods"]


def run(names: list[str]) -> None:
    from aq_brevitas.storage import atomic_write_json

    RESULTS.mkdir(exist_ok=True)
    for name in names:
        print(f"== {name}", flush=True)
        result = importlib.import_module(name).main()
        atomic_write_json(RESULTS / f"{name}.json", result)


def render() -> None:
    from aq_brevitas.storage import atomic_write_text
    from render_docs import render_benchmarks

    results = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
    atomic_write_text(HERE.parent / "docs" / "benchmarks.md", render_benchmarks(results))
    print("wrote docs/benchmarks.md")


def environment() -> str:
    """Date, machine and versions, printed first so a console log says where its figures come from."""
    from importlib.metadata import PackageNotFoundError, version

    from common import header

    others = []
    for pkg in ("aq-brevitas", "torchattacks", "qonnx", "onnx", "onnxruntime", "torchao"):
        try:
            others.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            others.append(f"{pkg} (not installed)")
    return f"{header()}\n{' · '.join(others)}"


if __name__ == "__main__":
    args = sys.argv[1:]
    print(environment(), flush=True)
    if args != ["--render"]:
        run([a for a in args if a in BENCHMARKS] or [b for b in BENCHMARKS if (HERE / f"{b}.py").exists()])
    render()
