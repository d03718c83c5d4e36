"""The one plain-text table layout the command line and the run summary print."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def text_table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, left: int = 1) -> str:
    """``header`` and ``rows`` as aligned text: each column as wide as its longest cell (header
    included), columns one space apart, the first ``left`` columns left-aligned and the others
    right-aligned, a dashed rule under the header. Cells are formatted with ``str``; every line has
    the same length. Raises ``ValueError`` when a row has another number of cells than the header.

    >>> print(text_table(("model", "bits"), [("float", "32.00"), ("uniform (avg-bits=3)", "3.00")]))
    model                 bits
    --------------------------
    float                32.00
    uniform (avg-bits=3)  3.00
    """
    cells = [tuple(map(str, header))] + [tuple(map(str, r)) for r in rows]
    if any(len(c) != len(header) for c in cells):
        raise ValueError(f"every row needs {len(header)} cells")
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return " ".join(
            v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True))
        )

    top = line(cells[0])
    return "\n".join([top, "-" * len(top), *map(line, cells[1:])])
