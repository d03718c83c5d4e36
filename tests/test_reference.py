"""Generated docs are current: CLI reference, API reference, and the error catalogue (tools/reference.py)."""

import importlib.util
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str):
    """The module ``tools/<name>.py`` (a development script, not part of the installed package)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = load_tool("reference")


@pytest.mark.parametrize("page", sorted(reference.PAGES))
def test_generated_page_is_current(page):
    expected = reference.PAGES[page]() + ("" if page == "troubleshooting.md" else "\n")
    actual = (reference.DOCS / page).read_text()
    assert actual == expected, f"docs/{page} is stale: run `python tools/reference.py`"


def test_every_error_has_a_fix():
    rows = reference.error_catalogue()
    assert len(rows) > 50
    missing = [(m, p) for m, _, p, fix in rows if not fix.strip()]
    assert not missing, missing


def test_api_reference_lists_every_public_name():
    import aq_brevitas

    text = (reference.DOCS / "api.md").read_text()
    for name in aq_brevitas.__all__:
        assert f"## `{name}`" in text


def test_benchmarks_page_is_rendered_from_the_saved_results(monkeypatch):
    """docs/benchmarks.md holds no hand-typed figure: it is exactly what the saved results render to."""
    import json
    import sys

    bench = reference.DOCS.parent / "benchmarks"
    monkeypatch.setattr(sys, "path", [str(bench), *sys.path])  # render_docs imports its sibling modules
    from render_docs import render_benchmarks

    results = {p.stem: json.loads(p.read_text()) for p in sorted((bench / "results").glob("*.json"))}
    actual = (reference.DOCS / "benchmarks.md").read_text()
    assert actual == render_benchmarks(results), (
        "docs/benchmarks.md is stale: run `python benchmarks/run_all.py --render`"
    )
