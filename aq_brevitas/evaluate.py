"""Accuracy under attack, and a robustness report that flags gradient masking.

:func:`accuracy` and :func:`attack_accuracy` are the building blocks; :func:`evaluate_robustness`
runs the full suite of METHOD.md ("Adversarial fine-tuning after selection"): clean, FGSM and PGD-k
at several ε, optionally AutoAttack, a gradient-free Square attack, and a checklist of sanity checks
that flag -- never hide -- the signs of gradient masking. :func:`frozen_quant_weights` makes attacks
on Brevitas models cheaper by quantizing their (constant) weights once instead of at every forward.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .attacks import check_eps, make_attack
from .errors import ConfigError
from .layers import check_forward, paused_observers

SCHEMA = "aq-brevitas/robustness/v1"
ATTACK_NAMES = ("clean", "fgsm", "pgd")
TOLERANCE = 0.005  # 0.5 pt: PGD vs FGSM, and monotonicity in ε
GRADIENT_FREE_TOLERANCE = 0.02  # 2 pts: Square may be this much stronger than PGD before we flag it
LARGE_EPS_MAX_ACCURACY = 0.05  # at ε=0.5 an honest attack leaves (almost) nothing standing
BALL_TOLERANCE = 1e-6


def _check_inputs(x: torch.Tensor) -> None:
    if not torch.is_floating_point(x):
        raise ConfigError(
            f"inputs have dtype {x.dtype}, expected floating point images", "convert with x.float() / 255"
        )
    if x.numel() and not torch.isfinite(x).all():
        raise ConfigError("inputs contain NaN or Inf", "pass finite images in [0, 1]")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ConfigError(
            f"inputs span [{x.min().item():.3g}, {x.max().item():.3g}], outside [0, 1]",
            "pass un-normalised images in [0, 1]; normalise inside the model",
        )


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int):
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


# -- frozen quantized weights -----------------------------------------------------------------------------
@contextlib.contextmanager
def frozen_quant_weights(model: nn.Module) -> Iterator[int]:
    """Quantize each Brevitas layer's weights once and reuse them until exit; yields how many layers.

    Also stops torch.ao/torchao fake-quant observers until exit (they keep observing in eval mode).
    Weights do not change during an attack, yet every forward re-quantizes them (stats, scale, round);
    skipping that made a PGD-7 fine-tuning step of the W4A8 zoo CNN 1.07-1.08x faster (medians of
    interleaved rounds, two runs of benchmarks/finetune_speed.py; the activation quantizers, which
    must run every forward, dominate). Inside the block the quantized weights are constants, so
    outputs and input gradients are unchanged but **weights get no gradient** -- use it around
    attacks, not around training steps. Enter it in the mode the attack runs the model in
    (attacks run in eval mode). Layers whose weight quantizer needs the quantized input are left alone.
    The original ``quant_weight`` is restored on exit, also on exceptions.
    """
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer as QuantWBIOL

    missing = object()
    frozen: list[tuple[nn.Module, Any]] = []
    with paused_observers(model):
        try:
            for m in model.modules():
                if not isinstance(m, QuantWBIOL):
                    continue
                wq = m.weight_quant
                if not wq.is_quant_enabled or wq.requires_quant_input:
                    continue
                with torch.no_grad():
                    qw = m.quant_weight()
                previous = m.__dict__.get("quant_weight", missing)
                m.quant_weight = _constant(qw)
                frozen.append((m, previous))
            yield len(frozen)
        finally:
            for m, previous in reversed(frozen):
                if previous is missing:
                    m.__dict__.pop("quant_weight", None)
                else:
                    m.quant_weight = previous


def _constant(value: Any):
    return lambda *args, **kwargs: value


# -- building blocks --------------------------------------------------------------------------------------
@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 500) -> float:
    """Clean top-1 accuracy of ``model`` (in eval mode) on ``(x, y)``."""
    _check_inputs(x)
    check_forward(model, x)
    model.eval()
    with frozen_quant_weights(model):
        correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in _batches(x, y, batch_size))
    return correct / max(len(y), 1)


def attack_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str | Any = "pgd",
    *,
    eps: float = 0.1,
    steps: int = 20,
    batch_size: int = 250,
    seed: int = 0,
    progress: bool = False,
    **attack_kwargs: Any,
) -> float:
    """Accuracy on adversarial examples made by ``attack`` (a name for :func:`make_attack`, or an attack).

    ``normalization=(mean, std)`` is for a model that expects normalised inputs: ``x`` stays in [0, 1]
    and the model is fed ``(x - mean) / std``.
    """
    from tqdm.auto import tqdm

    _check_inputs(x)
    normalization = attack_kwargs.pop("normalization", None)
    check_forward(model if normalization is None else _Normalized(model, normalization), x)
    if normalization is not None:
        model = _Normalized(model, normalization)
    model.eval()
    atk = (
        make_attack(attack, model, eps=eps, steps=steps, seed=seed, **attack_kwargs)
        if isinstance(attack, str)
        else attack
    )
    torch.manual_seed(seed)
    correct = 0
    with frozen_quant_weights(model):
        for xb, yb in tqdm(
            list(_batches(x, y, batch_size)),
            desc=f"{attack if isinstance(attack, str) else type(attack).__name__} eps={eps}",
            disable=not progress,
            leave=False,
        ):
            adv = atk(xb, yb)
            with torch.no_grad():
                correct += (model(adv).argmax(1) == yb).sum().item()
    return correct / max(len(y), 1)


# -- the report -------------------------------------------------------------------------------------------
@dataclass
class AttackResult:
    """One attack at one ε: robust accuracy on ``images`` images (an example counts if clean- and adv-correct)."""

    attack: str
    eps: float
    accuracy: float
    images: int
    seconds: float
    steps: int | None = None  # iterations (PGD), 1 (FGSM), queries (Square), None (clean, AutoAttack)
    restarts: int = 1


@dataclass
class MaskingCheck:
    """One gradient-masking sanity check. ``passed=None`` means it could not run (its attacks were off)."""

    name: str
    passed: bool | None
    detail: str


@dataclass
class RobustnessReport:
    """What :func:`evaluate_robustness` measured, the masking checklist, and how long it took."""

    model: str
    images: int
    clean_accuracy: float
    results: list[AttackResult] = field(default_factory=list)
    checks: list[MaskingCheck] = field(default_factory=list)
    seconds: float = 0.0
    max_violation: float = 0.0  # worst excursion of any adversarial example outside its ε-ball or [0, 1]
    meta: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def masking_suspected(self) -> bool:
        """True when any check that ran failed: the robust accuracies are then likely overestimates."""
        return any(c.passed is False for c in self.checks)

    def result(self, attack: str, eps: float) -> AttackResult:
        for r in self.results:
            if r.attack == attack and (attack == "clean" or math.isclose(r.eps, eps, abs_tol=1e-9)):
                return r
        have = ", ".join(f"{r.attack}@{r.eps:g}" for r in self.results)
        raise ConfigError(f"no result for attack {attack!r} at eps={eps:g}", f"use one of {have}")

    def accuracy(self, attack: str, eps: float = 0.0) -> float:
        """Accuracy of ``attack`` at ``eps`` ('clean' ignores ``eps``)."""
        return self.result(attack, eps).accuracy

    def check(self, name: str) -> MaskingCheck:
        for c in self.checks:
            if c.name == name:
                return c
        raise ConfigError(f"no check named {name!r}", f"use one of {', '.join(c.name for c in self.checks)}")

    # serialisation
    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Any) -> RobustnessReport:
        if not isinstance(d, Mapping) or d.get("schema") != SCHEMA:
            raise ConfigError("not a robustness report (missing or wrong 'schema')", f"expected {SCHEMA!r}")
        try:
            return cls(
                model=str(d["model"]),
                images=int(d["images"]),
                clean_accuracy=float(d["clean_accuracy"]),
                results=[AttackResult(**r) for r in d.get("results", [])],
                checks=[MaskingCheck(**c) for c in d.get("checks", [])],
                seconds=float(d.get("seconds", 0.0)),
                max_violation=float(d.get("max_violation", 0.0)),
                meta=dict(d.get("meta", {})),
                settings=dict(d.get("settings", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed robustness report ({exc})", "re-create it") from None

    @classmethod
    def from_json(cls, text: str) -> RobustnessReport:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"robustness report is not valid JSON ({exc.msg})", "re-create it") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        from .storage import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RobustnessReport:
        from .storage import read_json

        return cls.from_dict(read_json(path, "robustness report"))

    # presentation
    def _attacks_in_order(self) -> list[str]:
        return list(dict.fromkeys(r.attack for r in self.results))

    def to_markdown(self) -> str:
        """A table attacks × ε (robust accuracy), then the gradient-masking checklist."""
        eps_cols = sorted({r.eps for r in self.results})
        head = ["attack", "images", "steps", *[f"ε={e:g}" for e in eps_cols], "seconds"]
        lines = [
            f"### Robustness of {self.model} ({self.images} images, {self.seconds:.1f} s)",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
        ]
        for name in self._attacks_in_order():
            rows = [r for r in self.results if r.attack == name]
            cells = {r.eps: f"{100 * r.accuracy:.1f}%" for r in rows}
            steps = rows[0].steps if rows[0].steps is not None else "–"
            if rows[0].restarts > 1:
                steps = f"{steps}×{rows[0].restarts}"
            lines.append(
                "| "
                + " | ".join(
                    [
                        name,
                        str(rows[0].images),
                        str(steps),
                        *[cells.get(e, "–") for e in eps_cols],
                        f"{sum(r.seconds for r in rows):.1f}",
                    ]
                )
                + " |"
            )
        lines += ["", "Gradient-masking checks:", ""]
        mark = {True: "✅", False: "⚠️", None: "–"}
        lines += [f"- {mark[c.passed]} `{c.name}`: {c.detail}" for c in self.checks]
        if self.masking_suspected:
            lines += [
                "",
                "⚠️ Gradient masking suspected: the robust accuracies above are likely overestimates.",
            ]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Accuracy vs ε per attack, clean accuracy as a horizontal line."""
        from .plots import plot_robustness

        series = {}
        for name in self._attacks_in_order():
            if name == "clean":
                continue
            rows = sorted((r for r in self.results if r.attack == name), key=lambda r: r.eps)
            series[f"{name} ({rows[0].images} img)"] = ([r.eps for r in rows], [r.accuracy for r in rows])
        title = f"{self.model}: robust accuracy" + (" (masking suspected)" if self.masking_suspected else "")
        plot_robustness(series, self.clean_accuracy, path, title=title)


# -- evaluation -------------------------------------------------------------------------------------------
def _as_tensors(data: Any, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` from a tensor pair or a DataLoader (its first ``limit`` images)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        x, y = data
    elif isinstance(data, torch.utils.data.DataLoader):
        xs, ys, n = [], [], 0
        for batch in data:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise ConfigError("the DataLoader does not yield (images, labels)", "wrap it to yield pairs")
            xs.append(batch[0])
            ys.append(batch[1])
            n += len(batch[0])
            if limit is not None and n >= limit:
                break
        if not xs:
            raise ConfigError("the DataLoader is empty", "pass at least one image")
        x, y = torch.cat(xs), torch.cat(ys)
    else:
        raise ConfigError(
            f"evaluation data of type {type(data).__name__} is not supported",
            "pass (images, labels) tensors or a DataLoader",
        )
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit must be positive, got {limit}", "pass limit>=1 or None")
        x, y = x[:limit], y[:limit]
    if len(x) != len(y) or len(x) == 0:
        raise ConfigError(
            f"{len(x)} images but {len(y)} labels", "pass matching, non-empty images and labels"
        )
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or y.dim() != 1:
        raise ConfigError(
            f"labels have dtype {y.dtype} and shape {tuple(y.shape)}", "pass 1-D integer labels"
        )
    _check_inputs(x)
    return x, y.long()


def _check_settings(eps: Any, attacks: Sequence[str], ints: Mapping[str, int], large_eps: float):
    eps_list = [eps] if isinstance(eps, (int, float)) else list(eps)
    if not eps_list:
        raise ConfigError("no eps given", "pass e.g. eps=(0.05, 0.1, 0.2)")
    eps_list = sorted({check_eps(e) for e in eps_list})
    names = [str(a).lower() for a in ([attacks] if isinstance(attacks, str) else attacks)]
    unknown = [a for a in names if a not in ATTACK_NAMES]
    if unknown:
        raise ConfigError(
            f"unknown attack(s) {', '.join(map(repr, unknown))}",
            f"use {', '.join(ATTACK_NAMES)}; AutoAttack and Square run via autoattack=True / gradient_free=True",
        )
    for key, value in ints.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be an integer >= 1, got {value!r}", f"pass {key}>=1")
    return eps_list, list(dict.fromkeys(names)), check_eps(large_eps, "large_eps")


def _subset(n: int, k: int, seed: int) -> torch.Tensor:
    """A seeded subset of ``k`` of ``n`` indices (sorted), the same for the same seed."""
    if k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


class _Normalized(nn.Module):
    """``model((x - mean) / std)``: lets every attack work on [0, 1] images, where ε and the ball check live.

    (torchattacks' own ``set_normalization_used`` expects *normalised* inputs and returns normalised
    adversarial examples, which is not this module's [0, 1] contract.)
    """

    def __init__(self, model: nn.Module, normalization: tuple[Sequence[float], Sequence[float]]) -> None:
        super().__init__()
        mean, std = list(normalization[0]), list(normalization[1])
        if not mean or len(mean) != len(std) or any(not s > 0 for s in std):
            raise ConfigError(
                f"normalization={normalization!r} is not a (mean, std) pair with positive stds",
                "pass e.g. normalization=((0.286,), (0.353,))",
            )
        self.model = model
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.register_buffer("mean", torch.tensor(mean, device=device).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, device=device).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


class _Runner:
    """Runs attacks batch by batch on clean-correct examples, tracking ε-ball violations."""

    def __init__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, progress: bool
    ) -> None:
        self.model, self.x, self.y = model, x, y
        self.batch_size, self.progress = batch_size, progress
        self.max_violation = 0.0
        self.worst = "none"
        self.checked = 0
        self.clean_correct = torch.zeros(0, dtype=torch.bool)
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).argmax(1)

    def clean(self) -> torch.Tensor:
        self.clean_correct = torch.cat(
            [
                (self.predict(xb.to(self.device)) == yb.to(self.device)).cpu()
                for xb, yb in _batches(self.x, self.y, self.batch_size)
            ]
        )
        return self.clean_correct

    def _track(self, adv: torch.Tensor, x: torch.Tensor, eps: float, label: str) -> None:
        if not torch.isfinite(adv).all():
            violation = math.inf
        else:
            linf = (adv - x).abs().flatten(1).amax(1)
            violation = max(
                (linf - eps).clamp(min=0).max().item(),
                (-adv).clamp(min=0).max().item(),
                (adv - 1).clamp(min=0).max().item(),
            )
        self.checked += len(adv)
        if violation > self.max_violation:
            self.max_violation, self.worst = violation, label

    def robust(
        self, name: str, eps: float, indices: torch.Tensor, *, seed: int, **kwargs: Any
    ) -> torch.Tensor:
        """Indices (a subset of ``indices``) still classified correctly after the attack."""
        from tqdm.auto import tqdm

        keep = indices[self.clean_correct[indices]]
        if len(keep) == 0 or eps == 0:
            return keep
        atk = make_attack(name, self.model, eps=eps, seed=seed, **kwargs)
        torch.manual_seed(seed)
        survived = []
        chunks = keep.split(self.batch_size)
        for idx in tqdm(chunks, desc=f"{name} ε={eps:g}", disable=not self.progress, leave=False):
            xb, yb = self.x[idx].to(self.device), self.y[idx].to(self.device)
            adv = atk(xb, yb)
            self._track(adv, xb, eps, f"{name} ε={eps:g}")
            survived.append(idx[(self.predict(adv) == yb).cpu()])
        return torch.cat(survived)


def evaluate_robustness(
    model: nn.Module,
    data: Any,
    *,
    eps: Sequence[float] | float = (0.05, 0.1, 0.2),
    attacks: Sequence[str] = ("clean", "fgsm", "pgd"),
    pgd_steps: int = 20,
    pgd_restarts: int = 1,
    autoattack: bool = False,
    gradient_free: bool = True,
    gradient_free_images: int = 100,
    square_queries: int = 300,
    large_eps: float = 0.5,
    large_eps_images: int = 200,
    batch_size: int = 250,
    limit: int | None = None,
    seed: int = 0,
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    progress: bool = True,
    name: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> RobustnessReport:
    """Clean, FGSM and PGD-k accuracy at each ε, a gradient-free Square attack (and PGD on the same
    subset), optionally AutoAttack, and the gradient-masking checklist -- the METHOD.md report.

    Robust accuracy counts an example only if it is classified correctly both clean and under
    attack (the AutoAttack convention); attacks run on clean-correct examples only. PGD uses a
    random start; with ``pgd_restarts > 1`` an example must survive every restart. Square, PGD on
    its subset and AutoAttack run on a seeded subset of ``gradient_free_images`` images at the
    largest ε; PGD at ``large_eps`` runs on a seeded subset of ``large_eps_images`` images.
    The caller's torch RNG state is left untouched.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    eps_list, names, large_eps = _check_settings(
        eps,
        attacks,
        {
            "pgd_steps": pgd_steps,
            "pgd_restarts": pgd_restarts,
            "gradient_free_images": gradient_free_images,
            "square_queries": square_queries,
            "large_eps_images": large_eps_images,
            "batch_size": batch_size,
        },
        large_eps,
    )
    x, y = _as_tensors(data, limit)
    check_forward(model if normalization is None else _Normalized(model, normalization), x)
    n = len(x)
    was_training = model.training
    model.eval()
    target = model if normalization is None else _Normalized(model, normalization).eval()
    run = _Runner(target, x, y, batch_size=batch_size, progress=progress)
    everyone = torch.arange(n)
    gf_idx = _subset(n, gradient_free_images, seed)
    big_idx = _subset(n, large_eps_images, seed + 1)
    top = eps_list[-1]

    jobs = [(attack, e, everyone) for attack in names if attack != "clean" for e in eps_list]
    if gradient_free:
        jobs += [("square", top, gf_idx), ("pgd-subset", top, gf_idx)]
    if autoattack:
        jobs.append(("autoattack", top, gf_idx))
    if not ("pgd" in names and large_eps in eps_list):
        jobs.append(("pgd-large-eps", large_eps, big_idx))

    results: list[AttackResult] = []
    try:
        with torch.random.fork_rng(devices=[]), frozen_quant_weights(model) as n_frozen:
            t0 = time.perf_counter()
            clean_acc = run.clean().float().mean().item()
            results.append(AttackResult("clean", 0.0, clean_acc, n, time.perf_counter() - t0))
            for attack, e, idx in tqdm(jobs, desc="robustness", disable=not progress):
                t0 = time.perf_counter()
                steps: int | None
                restarts = 1
                if attack == "fgsm":
                    steps, left = 1, run.robust("fgsm", e, idx, seed=seed)
                elif attack in ("pgd", "pgd-subset", "pgd-large-eps"):
                    steps, restarts, left = pgd_steps, pgd_restarts, idx
                    for r in range(pgd_restarts):
                        left = run.robust("pgd", e, left, seed=seed + r, steps=pgd_steps)
                elif attack == "square":
                    steps, left = (
                        square_queries,
                        run.robust("square", e, idx, seed=seed, n_queries=square_queries),
                    )
                else:
                    steps, left = None, run.robust("autoattack", e, idx, seed=seed)
                results.append(
                    AttackResult(
                        attack, e, len(left) / len(idx), len(idx), time.perf_counter() - t0, steps, restarts
                    )
                )
    finally:
        model.train(was_training)

    report = RobustnessReport(
        model=name or str((meta or {}).get("name", type(model).__name__)),
        images=n,
        clean_accuracy=clean_acc,
        results=results,
        max_violation=run.max_violation,
        meta={**dict(meta or {}), "frozen_quant_layers": n_frozen},
        settings={
            "eps": eps_list,
            "attacks": names,
            "pgd_steps": pgd_steps,
            "pgd_restarts": pgd_restarts,
            "autoattack": autoattack,
            "gradient_free": gradient_free,
            "gradient_free_images": len(gf_idx),
            "square_queries": square_queries,
            "large_eps": large_eps,
            "large_eps_images": len(big_idx),
            "seed": seed,
            "normalization": [list(normalization[0]), list(normalization[1])] if normalization else None,
        },
    )
    report.checks = masking_checks(report, checked=run.checked, worst=run.worst)
    report.seconds = time.perf_counter() - t_start
    return report


# -- the gradient-masking checklist -----------------------------------------------------------------------
def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _by_eps(report: RobustnessReport, attack: str) -> dict[float, float]:
    return {r.eps: r.accuracy for r in report.results if r.attack == attack}


def masking_checks(
    report: RobustnessReport, *, checked: int | None = None, worst: str = ""
) -> list[MaskingCheck]:
    """The METHOD.md sanity checks on a report's numbers; each failure is flagged, never hidden."""
    checks = []
    fgsm, pgd = _by_eps(report, "fgsm"), _by_eps(report, "pgd")
    common = sorted(set(fgsm) & set(pgd))
    if common:
        gaps = {e: pgd[e] - fgsm[e] for e in common}
        e = max(gaps, key=gaps.get)
        ok = gaps[e] <= TOLERANCE
        detail = f"PGD {_pct(pgd[e])} vs FGSM {_pct(fgsm[e])} at ε={e:g}" + (
            " (worst case)" if ok else " -- PGD should be the stronger attack"
        )
        checks.append(MaskingCheck("pgd_not_above_fgsm", ok, detail))
    else:
        checks.append(MaskingCheck("pgd_not_above_fgsm", None, "not run: needs both fgsm and pgd"))

    rises = []
    for attack in ("fgsm", "pgd"):
        curve = sorted({0.0: report.clean_accuracy, **_by_eps(report, attack)}.items())
        rises += [(b[1] - a[1], attack, a, b) for a, b in zip(curve, curve[1:], strict=False)]
    if rises:
        rise, attack, a, b = max(rises)
        ok = rise <= TOLERANCE
        detail = (
            "accuracy falls (or stays) as ε grows for every attack"
            if ok
            else f"{attack} accuracy rises from {_pct(a[1])} at ε={a[0]:g} to {_pct(b[1])} at ε={b[0]:g}"
        )
        checks.append(MaskingCheck("monotone_in_eps", ok, detail))
    else:
        checks.append(MaskingCheck("monotone_in_eps", None, "not run: needs fgsm or pgd"))

    large_eps = report.settings.get("large_eps", 0.5)
    big = [r for r in report.results if r.attack == "pgd-large-eps"] or [
        r for r in report.results if r.attack == "pgd" and math.isclose(r.eps, large_eps)
    ]
    if big:
        r = big[0]
        ok = r.accuracy <= LARGE_EPS_MAX_ACCURACY
        detail = f"PGD accuracy at ε={r.eps:g} is {_pct(r.accuracy)} on {r.images} images" + (
            "" if ok else f" (> {_pct(LARGE_EPS_MAX_ACCURACY)}: the attack cannot find what must exist)"
        )
        checks.append(MaskingCheck("large_eps_near_zero", ok, detail))
    else:
        checks.append(MaskingCheck("large_eps_near_zero", None, "not run"))

    sq = [r for r in report.results if r.attack == "square"]
    ps = [r for r in report.results if r.attack == "pgd-subset"]
    if sq and ps:
        ok = sq[0].accuracy >= ps[0].accuracy - GRADIENT_FREE_TOLERANCE
        detail = (
            f"Square ({sq[0].steps} queries) {_pct(sq[0].accuracy)} vs PGD {_pct(ps[0].accuracy)} "
            f"on the same {sq[0].images} images at ε={sq[0].eps:g}"
        ) + ("" if ok else " -- a gradient-free attack beats the gradient attack")
        checks.append(MaskingCheck("gradient_free_not_stronger", ok, detail))
    else:
        checks.append(MaskingCheck("gradient_free_not_stronger", None, "not run: gradient_free=False"))

    ok = report.max_violation <= BALL_TOLERANCE
    where = f" ({worst})" if worst and report.max_violation > 0 else ""
    counted = f"{checked} adversarial examples; " if checked is not None else ""
    checks.append(
        MaskingCheck(
            "in_epsilon_ball",
            ok,
            f"{counted}max violation of the ε-ball / [0, 1] {report.max_violation:.2e}{where}",
        )
    )
    return checks
