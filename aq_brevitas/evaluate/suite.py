"""Attack suites and their per-image worst case: the robust accuracy the package reports and selects by.

A suite is a chain of attacks at one ε, each run only on the images every earlier attack left
correctly classified (as the reference AutoAttack does), so an image broken by any attack counts
as broken. Two suites are named in :data:`SUITES`:

* ``"fast"`` (the default of :func:`~aq_brevitas.evaluate.evaluate_robustness`, of the
  never-worse-than-uniform check and of :func:`~aq_brevitas.search.validate_metric`): APGD-CE and
  APGD-DLR (100 iterations), APGD-T on the 3 highest-scoring other classes (25 iterations each), a
  transfer attack (PGD-20 on a float surrogate model, when one is given) and Square with 500
  queries. It was chosen by measurement against the reference on the zoo nets and masked
  quantized policies (docs/benchmarks.md, "Attack suite"): the targeted APGD closed most of the gap
  on the float and 8-bit nets, Square and transfer on the masked ones; temperature-scaled APGD-CE
  (``apgd-ce-scaled``, Gupta & Ajanthan) added nothing APGD-DLR did not.
* ``"reference"``: AutoAttack as Croce & Hein define it -- APGD-CE, APGD-T (9 target classes), FAB-T
  (100 iterations each) and Square with 5,000 queries -- built from the torchattacks classes
  (torchattacks' own ``AutoAttack`` runs APGD/APGD-T/FAB with 10 iterations).

While an attack runs, a :class:`Watch` on the model's forward records every adversarial point the
attack looks at, so a point seen but not returned ("silent success") is caught, and the best margin
per step, so an optimisation that was still progressing is caught (:mod:`aq_brevitas.evaluate.indicators`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..attacks import make_attack, normalized_inputs
from ..config import SUITE_ATTACKS, SUITES, AttackConfig
from ..errors import ConfigError
from ..forward import as_xy, eval_mode, frozen_quant_weights, require_single_input

REFERENCE_STEPS = 100  # APGD, APGD-T and FAB-T iterations of the reference AutoAttack
REFERENCE_QUERIES = 5000  # Square queries of the reference AutoAttack
TRANSFER_STEPS = 20  # PGD steps on the surrogate


@dataclass(frozen=True)
class ChainSettings:
    """How a chain runs: ``steps`` (APGD/FAB iterations; :func:`member_steps`), ``queries`` (Square),
    ``seed`` (every attack's), ``batch_size`` (images per attack call)."""

    steps: int = REFERENCE_STEPS
    queries: int = REFERENCE_QUERIES
    seed: int = 0
    batch_size: int = 250


#: the fast suite where selection measures robust accuracy (validate_metric, the never-worse-than-uniform
#: check): 25 APGD iterations and 100 Square queries. Measured on 500 held-out images of cnn-pgd w4a4
#: (ε = 0.1, CPU seconds): PGD-10 72.2 % in 3.8 s; PGD-10 + this 68.6 % in 38.5 s; with the report's
#: 100 iterations / 500 queries 67.6 % in 118 s.
SELECTION_SUITE: dict[str, Any] = {"suite": "fast", "settings": ChainSettings(steps=25, queries=100)}


@dataclass
class StepResult:
    """One attack of a chain: ``survived`` (bool over the chain's images: correct clean, after every
    earlier attack and after this one), ``attacked`` images, wall ``seconds``, ``seen`` (bool: the
    attack evaluated a misclassified point inside the ε-ball and [0, 1]), and ``trace`` (steps × images
    of the attack's first batch: each image's best margin so far after each gradient forward; None
    for attacks without gradient forwards)."""

    name: str
    survived: torch.Tensor
    attacked: int
    seconds: float
    seen: torch.Tensor
    trace: torch.Tensor | None = None
    steps: int | None = None


class Watch:
    """Watches ``model``'s forward while an attack works on ``x`` (labels ``y``) at budget ``eps``.

    Every row the model is given is matched to its nearest original (L2); a row within the ε-ball
    (and [0, 1]) of it that the model misclassifies marks that original in ``seen``. After each
    forward with gradients on, ``history`` gets each original's best (lowest) margin so far
    (true-class logit minus the largest other one; inf before it is first seen). Use as a context
    manager; ``trace()`` stacks the history (steps × images, None when empty).
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> None:
        self.model, self.x, self.y, self.eps = model, x.flatten(1), y, eps
        self.seen = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        self.best = torch.full((len(x),), float("inf"), device=x.device)
        self.history: list[torch.Tensor] = []
        self._input: torch.Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> Watch:
        self._handles = [
            self.model.register_forward_pre_hook(self._pre, prepend=True),
            self.model.register_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._input = args[0] if args and isinstance(args[0], torch.Tensor) else None

    def _post(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        grad = torch.is_grad_enabled()
        with torch.no_grad():
            self._record(out, grad)

    def _record(self, out: Any, grad: bool) -> None:
        z, logits = self._input, getattr(out, "value", out)
        if z is None or not isinstance(logits, torch.Tensor) or logits.dim() != 2 or len(z) == 0:
            return
        z = z.detach().flatten(1).to(self.x.dtype)
        if z.shape[1] != self.x.shape[1]:
            return
        idx = torch.cdist(z, self.x).argmin(1)
        inside = ((z - self.x[idx]).abs().amax(1) <= self.eps + 1e-5) & (z.min(1).values >= -1e-6)
        inside &= z.max(1).values <= 1 + 1e-6
        y = self.y[idx]
        true = logits.detach().gather(1, y[:, None])[:, 0]
        other = logits.detach().scatter(1, y[:, None], float("-inf")).amax(1)
        margin = torch.where(inside, true - other, torch.full_like(true, float("inf")))
        self.seen[idx[margin < 0]] = True
        self.best.scatter_reduce_(0, idx, margin, reduce="amin")
        if grad:
            self.history.append(self.best.cpu().clone())

    def trace(self) -> torch.Tensor | None:
        """The best margins after each gradient forward, steps × images (None: no such forward)."""
        return torch.stack(self.history) if self.history else None


def _builder(
    name: str,
    model: nn.Module,
    eps: float,
    *,
    steps: int,
    queries: int,
    seed: int,
    n_classes: int,
    surrogate: nn.Module | None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``attack(images, labels) -> adversarial images`` for one suite member (``transfer``: PGD on the
    surrogate, whose examples the caller classifies with ``model``)."""
    if name == "transfer":
        if surrogate is None:
            raise ConfigError("the transfer attack needs a surrogate model", "pass surrogate=float_model")
        return make_attack(AttackConfig("pgd", eps, TRANSFER_STEPS), surrogate, seed=seed)
    if name not in SUITE_ATTACKS:
        raise ConfigError(f"unknown suite attack {name!r}", f"use {', '.join(SUITE_ATTACKS)}")
    cfg = AttackConfig(name, eps, member_steps(name, steps), queries=queries)
    return make_attack(cfg, model, seed=seed, n_classes=n_classes)


def member_steps(name: str, steps: int) -> int:
    """Iterations a suite member runs for the suite's ``steps``: APGD-T3 a quarter per target (its 3
    targets cost 0.75 of one APGD-CE run, the split that measured best), the others ``steps``."""
    return max(1, steps // 4) if name == "apgd-t3" else steps


def run_chain(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    names: Sequence[str],
    *,
    alive: torch.Tensor | None = None,
    surrogate: nn.Module | None = None,
    settings: ChainSettings = ChainSettings(),
    on_adv: Callable[[torch.Tensor, torch.Tensor, float, str], None] | None = None,
) -> list[StepResult]:
    """Run the attacks ``names`` at ``eps`` one after another, each on the images still correct.

    ``x``, ``y``: images in [0, 1] and labels (the model is called as it is: the caller sets eval
    mode, normalisation and frozen weights). ``alive`` (bool over ``x``, default all) marks the
    images to attack at all (clean-correct, not broken yet). ``settings``: iterations, Square
    queries, seed and batch size; ``surrogate`` is the transfer attack's model; ``on_adv(adv, x,
    eps, label)`` sees every batch of adversarial examples (for the ε-ball check). Returns one
    :class:`StepResult` per attack (an attack with nothing left to attack takes no time); attacks whose
    loss needs more classes than the model has (APGD-T: 4, APGD-DLR and FAB-T: 3) are left out.
    """
    steps, queries, seed, batch_size = settings.steps, settings.queries, settings.seed, settings.batch_size
    alive = torch.ones(len(x), dtype=torch.bool) if alive is None else alive.clone().cpu()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n_classes = _n_classes(model, x[:1].to(device))
    out = []
    # the DLR losses rank logits: the targeted one reads the 4th largest, the untargeted the 3rd
    names = [n for n in names if n not in _MIN_CLASSES or n_classes >= _MIN_CLASSES[n]]
    for name in names:
        t0 = time.perf_counter()
        atk = None
        seen = torch.zeros(len(x), dtype=torch.bool)
        trace: torch.Tensor | None = None
        todo = alive.nonzero()[:, 0]
        for idx in todo.split(batch_size) if len(todo) else ():
            atk = atk or _builder(
                name, model, eps, steps=steps, queries=queries, seed=seed, n_classes=n_classes,
                surrogate=surrogate,
            )  # fmt: skip
            xb, yb = x[idx].to(device), y[idx].to(device)
            torch.manual_seed(seed)
            with Watch(model, xb, yb, eps) as watch:
                adv = atk(xb, yb)
                with torch.no_grad():
                    correct = model(adv).argmax(1) == yb
            if on_adv is not None:
                on_adv(adv, xb, eps, f"{name} ε={eps:g}")
            alive[idx[~correct.cpu()]] = False
            seen[idx] = watch.seen.cpu()
            trace = watch.trace() if trace is None else trace
        used = None if name == "transfer" else (queries if name == "square" else member_steps(name, steps))
        out.append(StepResult(name, alive.clone(), len(todo), time.perf_counter() - t0, seen, trace, used))
    return out


_MIN_CLASSES = {"apgd-t": 4, "apgd-t3": 4, "fab-t": 3, "apgd-dlr": 3}


@torch.no_grad()
def _n_classes(model: nn.Module, x: torch.Tensor) -> int:
    return int(model(x[:1]).shape[1]) if len(x) else 10


def suite_names(suite: str | Sequence[str], *, surrogate: bool) -> tuple[str, ...]:
    """The attacks of ``suite`` (a name of :data:`SUITES` or a sequence of attack names), without
    ``transfer`` when there is no surrogate. Raises :class:`ConfigError` for unknown names."""
    names = SUITES.get(suite) if isinstance(suite, str) else tuple(suite)
    if names is None:
        raise ConfigError(f"unknown attack suite {suite!r}", f"use one of {', '.join(SUITES)}, or a tuple")
    bad = [n for n in names if n not in SUITE_ATTACKS]
    if bad:
        raise ConfigError(
            f"unknown suite attack(s) {', '.join(map(repr, bad))}", f"use {', '.join(SUITE_ATTACKS)}"
        )
    return tuple(n for n in names if surrogate or n != "transfer")


def worst_case_accuracy(
    model: nn.Module, x: Any, y: torch.Tensor | None = None, *, eps: float = 0.1
) -> float:
    """Robust accuracy in [0, 1] under the fast suite at ``eps`` (L-inf, images in [0, 1]): the
    fraction of images classified correctly clean and after every attack of the chain (the per-image
    worst case). The shorthand of ``suite_accuracies(model, x, y, eps=eps)["worst case"]``; for another
    suite, other settings, a transfer surrogate or normalised inputs, call :func:`suite_accuracies`.

    The kind of number selection uses (the never-worse-than-uniform check, :func:`validate_metric`),
    cheaper than :func:`~aq_brevitas.evaluate.evaluate_robustness` (no report, no checks). ``x``,
    ``y``: any data :func:`~aq_brevitas.forward.as_xy` accepts. The model is attacked in eval mode and
    comes back in its own mode; the caller's RNG state is kept. Raises :class:`ConfigError` for bad
    data, :class:`ModelError` for a model without input gradient.

    >>> import torch
    >>> from torch import nn
    >>> from aq_brevitas.evaluate.suite import worst_case_accuracy
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    >>> x = torch.rand(6, 1, 4, 4)
    >>> 0.0 <= worst_case_accuracy(model, x, model(x).argmax(1), eps=0.05) <= 1.0
    True
    """
    return suite_accuracies(model, x, y, eps=eps)["worst case"]


def suite_accuracies(
    model: nn.Module,
    x: Any,
    y: torch.Tensor | None = None,
    *,
    eps: float = 0.1,
    suite: str | Sequence[str] = "fast",
    surrogate: nn.Module | None = None,
    settings: ChainSettings | None = None,
    pgd_steps: int | None = None,
    normalization: Any = None,
) -> dict[str, float]:
    """Accuracy in [0, 1] after each step of the chain, cumulative: ``"clean"``, then (with
    ``pgd_steps``) ``"pgd"`` -- PGD-``pgd_steps`` alone, run first --, then each attack of ``suite``
    on the images still standing, and ``"worst case"`` (the last). ``x``, ``y``: any data
    :func:`~aq_brevitas.forward.as_xy` accepts, images in [0, 1]. ``suite``: ``"fast"`` (APGD-CE,
    APGD-DLR, APGD-T3, transfer from ``surrogate`` when given, Square), ``"reference"`` or attack names
    of :data:`SUITE_ATTACKS`. ``settings``: a :class:`ChainSettings` (APGD/FAB iterations, Square
    queries, seed, batch size; default: 100 iterations, 500 queries, seed 0). ``normalization=(mean,
    std)`` feeds both models normalised inputs. Errors and side effects as :func:`worst_case_accuracy`.

    >>> import torch
    >>> from torch import nn
    >>> from aq_brevitas.evaluate.suite import ChainSettings, suite_accuracies
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    >>> x = torch.rand(20, 1, 8, 8)
    >>> fast = ChainSettings(steps=5, queries=10)
    >>> acc = suite_accuracies(model, x, model(x).argmax(1), eps=0.05, settings=fast, pgd_steps=5)
    >>> list(acc), acc["worst case"] <= acc["pgd"] <= acc["clean"]
    (['clean', 'pgd', 'apgd-ce', 'apgd-dlr', 'apgd-t3', 'square', 'worst case'], True)
    """
    require_single_input(model, "suite_accuracies")
    xs, ys = as_xy(x if y is None else (x, y), name="inputs")
    names = suite_names(suite, surrogate=surrogate is not None)
    other = surrogate if surrogate is not None else model
    out: dict[str, float] = {}
    with (
        normalized_inputs(model, normalization),
        normalized_inputs(other, normalization),
        torch.random.fork_rng(devices=[]),
        eval_mode(model),
        eval_mode(other),
        frozen_quant_weights(model),
    ):
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            alive = torch.cat([(model(xb.to(device)).argmax(1) == yb.to(device)).cpu()
                               for xb, yb in zip(xs.split(250), ys.split(250), strict=True)])  # fmt: skip
        out["clean"] = mask_share(alive)
        settings = settings or ChainSettings(steps=100, queries=500)
        if pgd_steps is not None:
            pgd = dataclasses.replace(settings, steps=pgd_steps)
            (st,) = run_chain(model, xs, ys, eps, ["pgd"], alive=alive, surrogate=surrogate, settings=pgd)
            alive, out["pgd"] = st.survived, mask_share(st.survived)
        for st in run_chain(model, xs, ys, eps, names, alive=alive, surrogate=surrogate, settings=settings):
            alive, out[st.name] = st.survived, mask_share(st.survived)
    out["worst case"] = mask_share(alive)
    return out


def mask_share(mask: torch.Tensor) -> float:
    """The fraction of True in a boolean mask, as an exact Python ratio."""
    return int(mask.sum()) / max(len(mask), 1)
