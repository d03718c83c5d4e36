"""Generated docs are current: CLI reference, API reference, and the error catalogue."""

import pytest

from aq_brevitas import reference


@pytest.mark.parametrize("page", sorted(reference.PAGES))
def test_generated_page_is_current(page):
    expected = reference.PAGES[page]() + ("" if page == "troubleshooting.md" else "\n")
    actual = (reference.DOCS / page).read_text()
    assert actual == expected, f"docs/{page} is stale: run `python -m aq_brevitas.reference`"


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
