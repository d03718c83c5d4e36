"""The typed rows of a run's summary: one :class:`SummaryRow` per model (float, uniform, aq-brevitas),
with the export's :class:`ParityRow` and the FINN check's :class:`FinnRow` for the quantized ones.

``to_dict()`` gives the flat record ``report.json`` holds under ``"rows"`` (one key per figure, as
before the rows were typed) and ``from_dict()`` reads it back. Importing this module does not import
torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ParityRow:
    """What the export's parity check measured (:class:`~aq_brevitas.export.ExportResult`):
    ``max_abs_diff`` (largest |QONNX − PyTorch| logit difference), ``allowed`` (the bound it was held
    to; None in records without it), ``without_flips`` (the difference once rounding-boundary flips get
    PyTorch's codes), ``boundary_flips`` (how many) and ``flip_detail`` (per node), on ``images``
    check images (None when not recorded)."""

    max_abs_diff: float
    allowed: float | None = None
    without_flips: float | None = None
    boundary_flips: int = 0
    flip_detail: Mapping[str, int] = field(default_factory=dict)
    images: int | None = None

    @classmethod
    def from_export(cls, record: Mapping[str, Any]) -> ParityRow:
        """The parity figures of an ``ExportResult.to_dict()`` record (``export.json``)."""
        diff = record["max_abs_diff"]
        return cls(
            max_abs_diff=diff,
            allowed=record.get("allowed_diff"),
            without_flips=record.get("diff_without_flips", diff),
            boundary_flips=record.get("boundary_flips", 0),
            flip_detail=dict(record.get("flip_detail", {})),
            images=record.get("images_checked"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The summary row's parity keys: ``parity``, ``parity_allowed``, ``parity_without_flips``,
        ``boundary_flips``, ``flip_detail``, ``parity_images``."""
        return {
            "parity": self.max_abs_diff,
            "parity_allowed": self.allowed,
            "parity_without_flips": self.without_flips,
            "boundary_flips": self.boundary_flips,
            "flip_detail": dict(self.flip_detail),
            "parity_images": self.images,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ParityRow:
        """Inverse of :meth:`to_dict`."""
        return cls(
            max_abs_diff=d["parity"],
            allowed=d.get("parity_allowed"),
            without_flips=d.get("parity_without_flips"),
            boundary_flips=d.get("boundary_flips", 0),
            flip_detail=dict(d.get("flip_detail", {})),
            images=d.get("parity_images"),
        )


@dataclass(frozen=True)
class FinnRow:
    """What the summary shows of a :class:`~aq_brevitas.export.FinnReport`: whether the file is
    FINN-ready (``passed``: static checks, and FINN's own steps when they ran), whether finn-plus ran
    (``ran``, its ``version``), the first failure or why FINN was skipped (``problem``, "" when none),
    and FINN's estimated ``lut``, ``bram`` (BRAM_18K), ``dsp``, ``fps`` (frames per second) on
    ``fpga_part`` (None when FINN did not run or stopped early)."""

    passed: bool | None
    ran: bool = False
    version: str | None = None
    problem: str = ""
    lut: float | None = None
    bram: float | None = None
    dsp: float | None = None
    fps: float | None = None
    fpga_part: str | None = None

    @classmethod
    def from_report(cls, finn: Mapping[str, Any]) -> FinnRow:
        """The summary fields of a ``FinnReport.to_dict()`` record."""
        run = finn.get("finn") or {}
        est = run.get("estimates") or {}
        total = est.get("total") or {}
        failed = [c for c in finn.get("checks", []) if not c["passed"]]
        step = next((st for st in run.get("steps", []) if not st["passed"]), None)
        problem = f"{failed[0]['name']}: {failed[0]['detail']}" if failed else ""
        if step is not None:
            problem = f"{step['name']}: {step['message']}"
        return cls(
            passed=finn.get("passed"),
            ran=bool(run),
            version=run.get("version"),
            problem=problem or finn.get("finn_skipped", ""),
            lut=total.get("LUT"),
            bram=total.get("BRAM_18K"),
            dsp=total.get("DSP"),
            fps=est.get("throughput_fps"),
            fpga_part=est.get("fpga_part"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FinnRow:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)

    def line(self, name: str, cost: str) -> str:
        """One line for the model ``name``: FINN-ready or not, FINN's estimates and then ``cost``."""
        if self.lut is not None:
            est = (f"{self.lut:,.0f} LUT, {self.bram:,.0f} BRAM_18K, {self.dsp:,.0f} DSP, "
                   f"{self.fps:,.0f} FPS est. on {self.fpga_part}")  # fmt: skip
        else:
            est = "no FINN estimates" + (f" ({self.problem})" if self.problem else "")
        ready = "FINN-ready" if self.passed else "NOT FINN-ready"
        who = f"finn-plus {self.version}" if self.ran else "static checks only"
        return f"FINN ({who}): {name}: {ready}; {est}; {cost}"


@dataclass(frozen=True)
class SummaryRow:
    """One model of a run's summary: its ``name`` (``"float"``, ``"uniform (<budget>)"``,
    ``"aq-brevitas (<budget>)"``), average weight bits (``avg_bits``; 32 for float), weight memory in
    KiB (``kib``), clean accuracy, ``robust`` accuracy at the run's ε (the per-image worst case over
    every attack, the figure to trust), ``pgd`` accuracy alone (accuracies are fractions in [0, 1]),
    whether gradient masking is suspected and the failed checks as ``warnings`` (one line each). The
    quantized models also carry their BOPs, the export's :class:`ParityRow` and, when FINN was the
    target, the :class:`FinnRow`; the float model has None there.

    >>> row = SummaryRow("float", 32.0, 12.5, clean=0.9, robust=0.6, pgd=0.7)
    >>> row.to_dict()["parity"] is None and SummaryRow.from_dict(row.to_dict()) == row
    True
    """

    name: str
    avg_bits: float
    kib: float
    clean: float
    robust: float
    pgd: float
    masking_suspected: bool = False
    warnings: tuple[str, ...] = ()
    bops: float | None = None
    parity: ParityRow | None = None
    finn: FinnRow | None = None

    def cost_text(self) -> str:
        """``"<BOPs> BOPs, <KiB> weight KiB"`` (the KiB alone when the BOPs are unknown)."""
        kib = f"{self.kib:.1f} weight KiB"
        return f"{self.bops:.3g} BOPs, {kib}" if self.bops else kib

    def to_dict(self) -> dict[str, Any]:
        """The flat record of ``report.json``: the fields above, ``parity: None`` for a model not
        exported, else the :meth:`ParityRow.to_dict` keys; ``bops`` and ``finn`` only when known."""
        d: dict[str, Any] = {
            "name": self.name,
            "avg_bits": self.avg_bits,
            "kib": self.kib,
            "clean": self.clean,
            "robust": self.robust,
            "pgd": self.pgd,
            "parity": None,
            "masking_suspected": self.masking_suspected,
            "warnings": list(self.warnings),
        }
        if self.parity is not None:
            d.update(self.parity.to_dict())
        if self.bops is not None:
            d["bops"] = self.bops
        if self.finn is not None:
            d["finn"] = self.finn.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SummaryRow:
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=d["name"],
            avg_bits=d["avg_bits"],
            kib=d["kib"],
            clean=d["clean"],
            robust=d["robust"],
            pgd=d["pgd"],
            masking_suspected=d.get("masking_suspected", False),
            warnings=tuple(d.get("warnings", ())),
            bops=d.get("bops"),
            parity=None if d.get("parity") is None else ParityRow.from_dict(d),
            finn=None if d.get("finn") is None else FinnRow.from_dict(d["finn"]),
        )
