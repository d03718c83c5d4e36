"""The settings of one :func:`~aq_brevitas.run` (:class:`RunConfig`), its stages and their checks.

Torch-free: the CLI builds ``aq-brevitas run --help`` from it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ..config import InputNormalization
from ..errors import ConfigError, a_type
from ..search.config import DEFAULT_METHOD, SCORED_METHODS

if TYPE_CHECKING:
    from ..budget import Budget


STAGES = ("score", "search", "quantize", "finetune", "evaluate", "export", "report")


RUN_METHODS = SCORED_METHODS  # the run compares against uniform itself, so every scored method


def _setting(default: Any, flag: str, help: str, *, minimum: int | None = None, **argparse: Any) -> Any:
    """A RunConfig field with the ``aq-brevitas run`` option that sets it (read by the CLI and by the
    error messages here) and, for a count, its smallest allowed value."""
    return field(default=default, metadata={"flag": flag, "help": help, "minimum": minimum, **argparse})


@dataclass(frozen=True)
class RunConfig(InputNormalization):
    """Settings of one pipeline run (all JSON-serialisable); each field's metadata names the option
    of ``aq-brevitas run`` that sets it.

    Selection (scores, search, calibration) uses ``calib_images`` + ``val_images`` held-out images
    (see :class:`~aq_brevitas.pipeline.data.RunData`); fine-tuning a ``finetune_images`` training subset
    (None = all) for ``finetune_epochs`` epochs of PGD-``finetune_steps``; the report ``test_images``
    test images (None = all) under PGD-``pgd_steps``. ``eps`` (L-inf, inputs in [0, 1]) is also
    evaluated when ``eval_eps`` lacks it; the other radii of ``eval_eps`` on the first
    ``eval_eps_images`` of those test images (None: all of them), in a report of their own. ``data_dir``: the IDX directory to read when ``run`` is
    given no data (None: ``$AQ_DATA_DIR`` or Fashion-MNIST). ``normalization=(mean, std)`` (one value,
    or one per input channel, dim 1) for a model that expects ``(x - mean) / std``: the search,
    calibration, fine-tuning and evaluation feed it that while the data and ε stay in [0, 1] (the
    export's ONNX takes normalised inputs, as the model does). ``workers``: forked processes the
    evaluation's independent reports run on (:func:`~aq_brevitas.workers.run_jobs`; same results).
    """

    budget: str = _setting("avg-bits=3", "--budget", "avg-bits=N, bytes=N, kib=N or bops=N")
    eps: float = _setting(0.1, "--eps", "L-inf radius the policy is searched, fine-tuned and evaluated for")
    method: str = _setting(DEFAULT_METHOD, "--method", "search method", choices=RUN_METHODS)
    target: str = _setting(
        "finn", "--target", "finn: integer inputs on every layer (quantized after each ReLU), FINN's front end "
        "and estimates at export; generic: any policy", choices=("finn", "generic"),
    )  # fmt: skip
    calib_images: int = _setting(256, "--calib-images", "held-out (val) images for scoring", minimum=1)
    val_images: int = _setting(
        500, "--val-images", "other held-out images for the comparison with uniform", minimum=1
    )
    finetune_images: int | None = _setting(
        4096, "--train-images", "training subset for fine-tuning (0 = all)", minimum=1
    )
    finetune_epochs: int = _setting(1, "--epochs", "fine-tuning epochs", minimum=1)
    finetune_steps: int = _setting(7, "--train-steps", "PGD steps of the fine-tuning attack", minimum=1)
    # One export input plus at least one parity image.
    test_images: int | None = _setting(
        2000, "--test-images", "test images for the report (0 = all 10k)", minimum=2
    )
    pgd_steps: int = _setting(20, "--pgd-steps", "PGD steps of the evaluation", minimum=1)
    eval_eps: tuple[float, ...] = _setting(
        (0.05, 0.1, 0.2), "--eval-eps", "L-inf radii evaluated besides --eps"
    )
    eval_eps_images: int | None = _setting(
        None, "--eval-eps-images", "test images for the --eval-eps radii besides --eps (0 = --test-images)",
        minimum=1,
    )  # fmt: skip
    seed: int = _setting(0, "--seed", "seed of every random draw", minimum=0)
    workers: int = _setting(
        1, "--workers", "processes the evaluation's reports are spread over (the results are the same; "
        "2 on a 2-core machine)", minimum=1,
    )  # fmt: skip
    data_dir: str | None = _setting(None, "--data-dir", "directory of the IDX files")


def flag_of(name: str) -> str:
    """The ``aq-brevitas run`` option that sets RunConfig field ``name``."""
    return next(f.metadata["flag"] for f in fields(RunConfig) if f.name == name)


# -- checks before any work ----------------------------------------------------------------------------
def _check_count(name: str, value: Any, flag: str, minimum: int, none_ok: bool) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fix = f"pass {flag} N with N >= {minimum}" + (f" ({flag} 0 = all)" if none_ok else "")
        raise ConfigError(f"{flag} (RunConfig.{name}) must be an integer >= {minimum}, got {value!r}", fix)


def check_config(cfg: RunConfig) -> Budget:
    """Refuse a bad setting before any work or any file is written; returns the parsed Budget."""
    from ..budget import Budget
    from ..config import check_eps

    if not isinstance(cfg, RunConfig):
        raise ConfigError(f"config is {a_type(cfg)}, not a RunConfig", "pass RunConfig(...)")
    if not isinstance(cfg.budget, str):
        raise ConfigError(f"budget {cfg.budget!r} is not a string", "write e.g. --budget avg-bits=3")
    budget = Budget.parse(cfg.budget)
    check_eps(cfg.eps, "eps")
    for e in cfg.eval_eps:
        check_eps(e, "eval_eps")
    if cfg.method not in RUN_METHODS:
        raise ConfigError(f"unknown search method {cfg.method!r}", f"use one of {', '.join(RUN_METHODS)}")
    for f in fields(RunConfig):
        if f.metadata.get("minimum") is not None:
            none_ok = "None" in str(f.type)
            _check_count(f.name, getattr(cfg, f.name), f.metadata["flag"], f.metadata["minimum"], none_ok)
    return budget
