"""Indicators of attack failure (Pintor et al. 2022 list such signs): automated checks that say when
an attack's robust accuracy cannot be trusted, next to the five gradient-masking checks of
:mod:`aq_brevitas.evaluate.report`.

Each returns a :class:`~aq_brevitas.evaluate.report.MaskingCheck` stating its numbers; ``passed=False`` is a
warning in the report and in ``run``'s summary, ``passed=None`` means it could not run.

* ``input_gradient_nonzero``: the margin loss has a non-zero, finite input gradient at the clean
  points (zero: the model is flat or non-differentiable there, e.g. rounds its input).
* ``stable_under_noise``: tiny uniform noise does not change predictions (a model that does is
  random or shattered, and single attack runs are not reproducible).
* ``no_silent_success``: no image that an attack saw misclassified inside the ε-ball is counted as
  robust (the attack found an adversarial point but did not return it).
* ``optimisation_complete``: the first white-box attack was done: few images it left standing were
  still losing margin fast enough over its last quarter of steps that another quarter would break
  them.
* ``white_box_strongest``: the transfer and gradient-free attacks break at most a few images the
  white-box attacks could not (more: the gradients mislead).
* ``unconstrained_reaches_zero``: an attack with ε = 1 (any image in [0, 1]) leaves nothing standing.

A :class:`Watch` on the model's forward records, while an attack runs, what the silent-success and
optimisation indicators read; :func:`chain_alarm` reads them from a chain before its transfer and
gradient-free attacks, for the adaptive suite's escalation (:mod:`aq_brevitas.evaluate.suite`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .report import GRADIENT_FREE_TOLERANCE, MaskingCheck

INDICATORS = (
    "input_gradient_nonzero",
    "stable_under_noise",
    "no_silent_success",
    "optimisation_complete",
    "white_box_strongest",
    "unconstrained_reaches_zero",
)
ZERO_GRADIENT_MAX = 0.01  # fraction of images allowed a zero input gradient of the margin
NOISE_FLIPS_MAX = 0.03  # fraction of images whose prediction tiny noise may change
NOISE_DRAWS = 4
LATE_BREAKS_MAX = 0.02  # share of images an attack's last-quarter progress says more steps would break
UNCONSTRAINED_EPS = 1.0


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _share_check(
    name: str, count: int, total: int, allowed: float, what: tuple[str, str], *, warning: str, note: str = ""
) -> MaskingCheck:
    """Check ``name``: passed while ``count`` of ``total`` stays within the share ``allowed``. ``what``:
    (the things counted, what they do); ``note`` follows the numbers; ``warning`` says what a failure means."""
    share = count / max(total, 1)
    ok = share <= allowed
    detail = f"{count} of {total} {what[0]} ({_pct(share)}) {what[1]} (allowed {_pct(allowed)}){note}"
    return MaskingCheck(name, ok, detail + ("" if ok else f" -- {warning}"))


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    true = logits.gather(1, y[:, None])[:, 0]
    return true - logits.scatter(1, y[:, None], float("-inf")).amax(1)


def input_gradient_check(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int
) -> MaskingCheck:
    """``input_gradient_nonzero``: the share of images whose margin (true logit minus the best other) has
    an all-zero or non-finite input gradient at the clean point, and the same for cross-entropy (which
    vanishes on very confident examples; APGD-DLR and the scaled-logit attack do not depend on it).
    The model is called as it is (eval mode and normalisation are the caller's)."""
    zero_margin = zero_ce = 0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].detach().clone().requires_grad_(True)
        yb = y[i : i + batch_size]
        with torch.enable_grad():
            logits = model(xb)
            logits = getattr(logits, "value", logits)
            (g_margin,) = torch.autograd.grad(
                _margin(logits, yb).sum(), xb, retain_graph=True, allow_unused=True
            )
            ce = nn.functional.cross_entropy(logits, yb, reduction="sum")
            (g_ce,) = torch.autograd.grad(ce, xb, allow_unused=True)
        for g, counter in ((g_margin, "m"), (g_ce, "c")):
            flat = torch.zeros_like(xb).flatten(1) if g is None else g.flatten(1)
            bad = int(((flat.abs().amax(1) == 0) | ~torch.isfinite(flat).all(1)).sum())
            if counter == "m":
                zero_margin += bad
            else:
                zero_ce += bad
    return _share_check(
        "input_gradient_nonzero", zero_margin, len(x), ZERO_GRADIENT_MAX,
        ("images", "have a zero or non-finite input gradient of the margin at the clean point"),
        note=f"; cross-entropy: {zero_ce}", warning="gradient attacks get no signal there",
    )  # fmt: skip


@torch.no_grad()
def noise_stability_check(
    model: nn.Module, x: torch.Tensor, *, amplitude: float, batch_size: int, seed: int
) -> MaskingCheck:
    """``stable_under_noise``: the share of images whose prediction changes under any of
    :data:`NOISE_DRAWS` draws of uniform noise in ±``amplitude`` (clipped to [0, 1])."""
    gen = torch.Generator().manual_seed(seed)
    flips = 0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        base = model(xb).argmax(1)
        changed = torch.zeros(len(xb), dtype=torch.bool)
        for _ in range(NOISE_DRAWS):
            noise = (torch.rand(xb.shape, generator=gen) * 2 - 1).to(xb) * amplitude
            changed |= (model((xb + noise).clamp(0, 1)).argmax(1) != base).cpu()
        flips += int(changed.sum())
    return _share_check(
        "stable_under_noise", flips, len(x), NOISE_FLIPS_MAX,
        ("predictions", f"change under uniform noise of ±{amplitude:.2g} ({NOISE_DRAWS} draws)"),
        warning="the model is unstable at the scale attacks work at",
    )  # fmt: skip


def silent_success_check(silent: dict[float, int], images: int) -> MaskingCheck:
    """``no_silent_success``: per ε, the images an attack of the suite saw misclassified inside the
    ε-ball that the per-image worst case still counts as robust (``silent``; empty: no suite ran).

    >>> from aq_brevitas.evaluate.indicators import silent_success_check
    >>> silent_success_check({0.1: 0}, 100).passed, silent_success_check({0.1: 3}, 100).passed
    (True, False)
    """
    if not silent:
        return MaskingCheck("no_silent_success", None, "not run: no attack suite ran")
    ok = all(v == 0 for v in silent.values())
    per = ", ".join(f"{v} at ε={e:g}" for e, v in sorted(silent.items()))
    detail = f"images seen adversarial during an attack but counted robust: {per} (of {images})" + (
        "" if ok else " -- an attack found an adversarial point and did not return it"
    )
    return MaskingCheck("no_silent_success", ok, detail)


def would_break(trace: torch.Tensor) -> tuple[int, int]:
    """``(n, images)``: of the images a margin trace (steps × images of best margins so far) covers,
    how many are still standing (margin > 0) but would fall to 0 within another quarter of the steps
    at the rate of the last quarter."""
    seen = torch.isfinite(trace[-1])
    if len(trace) < 4 or not seen.any():
        return 0, int(seen.sum())
    end, at = trace[-1][seen], trace[(3 * len(trace)) // 4][seen]
    at = torch.where(torch.isfinite(at), at, end)
    rate = (at - end) / (len(trace) - (3 * len(trace)) // 4)  # margin lost per step, last quarter
    return int(((end > 0) & (end - rate * (len(trace) / 4) <= 0)).sum()), int(seen.sum())


def optimisation_check(traces: dict[float, tuple[str, torch.Tensor | None]]) -> MaskingCheck:
    """``optimisation_complete``: per ε, the first white-box attack's margin trace (``traces``: ε ->
    (attack, steps × images of best margins so far)); flagged when more than two images and more than
    :data:`LATE_BREAKS_MAX` of them are ones :func:`would_break` says another quarter of the steps
    would break."""
    usable = {e: (a, t) for e, (a, t) in traces.items() if t is not None and len(t) >= 4}
    if not usable:
        return MaskingCheck("optimisation_complete", None, "not run: no white-box suite attack ran")
    parts, ok = [], True
    for e, (attack, trace) in sorted(usable.items()):
        n, images = would_break(trace)
        ok &= n <= max(2.0, LATE_BREAKS_MAX * images)
        parts.append(f"{n} of {images} images at ε={e:g} ({attack}, {len(trace)} steps)")
    detail = (
        "images still standing that the last quarter's progress would break within another quarter: "
        + ", ".join(parts) + f" (allowed: 2 images or {_pct(LATE_BREAKS_MAX)})"
        + ("" if ok else " -- the attack was still progressing: more steps would break more images")
    )  # fmt: skip
    return MaskingCheck("optimisation_complete", ok, detail)


def white_box_check(extra: dict[float, tuple[int, int, str]]) -> MaskingCheck:
    """``white_box_strongest``: per ε, (images the transfer or gradient-free attacks broke after every
    white-box attack had run, images, which attacks). Flagged above :data:`GRADIENT_FREE_TOLERANCE`."""
    if not extra:
        return MaskingCheck("white_box_strongest", None, "not run: no transfer or gradient-free suite attack")
    share = {e: broke / max(n, 1) for e, (broke, n, _) in extra.items()}
    ok = all(v <= GRADIENT_FREE_TOLERANCE for v in share.values())
    per = ", ".join(
        f"{extra[e][0]} of {extra[e][1]} ({_pct(share[e])}) at ε={e:g} by {extra[e][2]}"
        for e in sorted(extra)
    )
    detail = (
        f"images broken only after the white-box attacks: {per} (allowed {_pct(GRADIENT_FREE_TOLERANCE)})"
        + ("" if ok else " -- transfer/gradient-free attacks beat the gradients: gradient masking")
    )
    return MaskingCheck("white_box_strongest", ok, detail)


def unconstrained_check(accuracy: float | None, images: int, attacks: str) -> MaskingCheck:
    """``unconstrained_reaches_zero``: the accuracy left by ``attacks`` at ε = 1 (None: not run) must be 0."""
    if accuracy is None:
        return MaskingCheck("unconstrained_reaches_zero", None, "not run")
    ok = accuracy == 0.0
    detail = f"{attacks} at ε={UNCONSTRAINED_EPS:g} leaves {_pct(accuracy)} of {images} images correct" + (
        "" if ok else " -- with no budget at all the attack should break every image"
    )
    return MaskingCheck("unconstrained_reaches_zero", ok, detail)


def chain_alarm(
    steps: list[tuple[str, torch.Tensor, torch.Tensor | None]],
    alive: torch.Tensor,
    black_box: tuple[str, ...],
) -> str | None:
    """The indicators readable from a chain before its transfer and gradient-free attacks: why they
    must run on every image still standing, or None. ``steps``: ``(attack, seen, trace)`` of the
    attacks run so far (``seen``: bool over images, :class:`Watch`);
    ``alive``: the images still standing. Fires on a silent success (an image seen misclassified
    still standing, as :func:`silent_success_check`) or when the first white-box attack's trace says
    more steps would break more images (as :func:`optimisation_check`).

    >>> import torch
    >>> from aq_brevitas.evaluate.indicators import chain_alarm
    >>> alive = torch.tensor([True, True, False])
    >>> chain_alarm([("apgd-ce", torch.tensor([False, False, True]), None)], alive, ("square",)) is None
    True
    >>> chain_alarm([("apgd-ce", torch.tensor([True, False, False]), None)], alive, ("square",))
    'no_silent_success: 1 image(s) seen misclassified inside the ε-ball still count as robust'
    """
    white = [(name, seen, trace) for name, seen, trace in steps if name not in black_box]
    silent = int(sum(((seen & alive).sum() for _, seen, _ in white), torch.tensor(0)))
    if silent:
        return (
            f"no_silent_success: {silent} image(s) seen misclassified inside the ε-ball still count as robust"
        )
    trace = white[0][2] if white else None
    if trace is not None and len(trace) >= 4:
        n, images = would_break(trace)
        if n > max(2.0, LATE_BREAKS_MAX * images):
            return f"optimisation_complete: {n} of {images} images were still losing margin at {white[0][0]}'s end"
    return None


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
