"""`make bench`: run every benchmark, save its JSON under benchmarks/results/, regenerate docs/benchmarks.md.

Usage: python benchmarks/run_all.py [name ...]   (default: all, in the order of BENCHMARKS; `--render` only
re-renders the doc)
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
# result name -> (benchmark module, its arguments); each result is saved as results/<name>.json
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "finetune_speed": ("finetune_speed", []),
    "export_parity": ("export_parity", []),
    "ao_agreement": ("ao_agreement", []),
    "search_cost": ("compare_methods", ["--search-cost-only"]),
    "ablation": ("ablation", []),
    "compare_methods": ("compare_methods", ["--no-search-cost"]),
    "attack_suite": ("attack_suite", ["--phase", "summary"]),
    "pareto": ("pareto", []),
    "layer_ranking": ("layer_ranking", []),
    "method_variants": ("method_variants", []),
    "twin_speed": ("twin_speed", ["--rounds", "15"]),
}


def run(names: list[str]) -> None:
    from aq_brevitas.storage import atomic_write_json

    RESULTS.mkdir(exist_ok=True)
    for name in names:
        module, argv = BENCHMARKS[name]
        print(f"== {name}: python benchmarks/{module}.py {' '.join(argv)}".rstrip(), flush=True)
        main = importlib.import_module(module).main
        result = main(argv) if argv else main()
        if result is not None:  # None: the benchmark wrote its own files (pareto: one per model and seed)
            atomic_write_json(RESULTS / f"{name}.json", result)


def render() -> None:
    from pareto_verdict import load_runs, plot_figures

    from aq_brevitas.storage import atomic_write_text
    from render_docs import render_benchmarks

    results = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
    plot_figures(load_runs(RESULTS))
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
        unknown = [a for a in args if a not in BENCHMARKS]
        if unknown:
            sys.exit(
                f"run_all.py: unknown benchmark {unknown[0]!r} -- choose from {', '.join(BENCHMARKS)} or --render"
            )
        run(args or list(BENCHMARKS))
    render()
