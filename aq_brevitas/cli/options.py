"""The options of ``aq-brevitas``, built from the config dataclasses (torch-free, so ``--help`` is instant).

An option takes its default, type and choices from the config field it sets (its ``dest`` is the
field's name), so the command line and the Python API cannot disagree. One word means one thing in
every subcommand:

==================  ===================================================================================
``--train-steps``   PGD steps of the training attack (``TrainConfig.steps``; ``run``: of fine-tuning)
``--train-images``  training images to train or fine-tune on, a seeded subset (``run``: 0 = all)
``--pgd-steps``     PGD steps of an evaluation attack (``EvalConfig``/``SearchConfig``/``RunConfig``)
``--pgd-restarts``  random restarts of that PGD attack
``--test-images``   test images a measurement uses (a seeded subset)
``--images``        images the command reads from its ``--split`` (``export``: from the test split)
``--calib-images``  calibration images: activation ranges (``quantize``, ``study``) or scores (search)
``--trades-beta``   β of the TRADES loss (``TrainConfig.trades_beta``)
==================  ===================================================================================

Any other word fails as argparse fails: one line on stderr naming the command, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import OPTIMIZERS, EvalConfig, TrainConfig
from ..errors import ConfigError
from ..pipeline.config import RunConfig
from ..policy import TARGETS
from ..search.config import (
    ESTIMATES,
    METHOD_SETTINGS,
    METHODS,
    PARETO_METHODS,
    LipschitzSettings,
    SearchConfig,
)


@dataclass(frozen=True)
class Option:
    """One command-line option: its flag and the keywords of ``argparse.add_argument``."""

    flag: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest") or self.flag[2:].replace("-", "_")


def _described(help: str, default: Any) -> str:
    """``help`` ending with the default, unless it has none to show or states it already."""
    if default is None or isinstance(default, bool) or "default" in help:
        return help
    shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
    return f"{help} (default {shown})"


def plain(flag: str, help: str, default: Any = None, **kwargs: Any) -> Option:
    """An option that sets no config field (a path, a switch of the command itself); ``kwargs`` are
    passed on to :meth:`argparse.ArgumentParser.add_argument`."""
    if kwargs.get("action") in ("store_true", "store_false"):
        return Option(flag, {"help": help, **kwargs})
    return Option(flag, {"help": _described(help, default), "default": default, **kwargs})


def _element_type(annotation: str) -> type:
    for name, kind in (("float", float), ("int", int)):
        if re.search(rf"\b{name}\b", annotation):
            return kind
    return str


def setting(
    config: Any, name: str, help: str | None = None, flag: str | None = None, **kwargs: Any
) -> Option:
    """The option for field ``name`` of the dataclass instance ``config``: its value is the default,
    its annotation the type (a tuple takes one or more values), its metadata the help, flag and
    choices unless given here. A bool field is a switch: ``--name`` when False by default,
    ``--no-name`` when True. ``kwargs`` are passed on to :meth:`argparse.ArgumentParser.add_argument`."""
    f = next(f for f in dataclasses.fields(config) if f.name == name)
    default, meta = getattr(config, name), f.metadata
    kw: dict[str, Any] = {"dest": name, "help": help or meta.get("help", "")}
    if "choices" in meta:
        kw["choices"] = meta["choices"]
    if isinstance(default, bool):
        word = name.replace("_", "-")
        kw["action"] = "store_false" if default else "store_true"
        return Option(flag or f"--{'no-' if default else ''}{word}", {**kw, **kwargs})
    flag = flag or meta.get("flag") or "--" + name.replace("_", "-")
    kw.update(default=default, type=_element_type(str(f.type)))
    if "choices" not in kw and "choices" not in kwargs:  # argparse shows the choices themselves
        kw["metavar"] = flag[2:].upper().replace("-", "_")
    kw["help"] = _described(kw["help"], default)
    if str(f.type).startswith("tuple"):
        kw["nargs"] = "+"
    return Option(flag, {**kw, **kwargs})


def values_for(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """What ``args`` holds for the fields of dataclass ``cls`` (options and fields share names). An
    ``int | None`` field given 0 becomes None: on the command line, 0 means "all" or "none" there."""
    out = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            if type(value) is int and value == 0 and "None" in str(f.type):
                value = None
            out[f.name] = (
                tuple(value) if isinstance(value, list) and str(f.type).startswith("tuple") else value
            )
    return out


def search_config(args: argparse.Namespace) -> SearchConfig:
    """The :class:`SearchConfig` the search options of ``args`` describe (method settings included)."""
    per_method = {k: v for cls in METHOD_SETTINGS.values() for k, v in values_for(args, cls).items()}
    return SearchConfig(**values_for(args, SearchConfig)).replace(**per_method)


# -- the option tables --------------------------------------------------------------------------------
DATA = (
    plain(
        "--data-dir",
        "directory of IDX files, samples of any shape (default: $AQ_DATA_DIR or "
        "/usr/share/datasets/fashion-mnist)",
    ),
    plain("--threads", "torch intra-op threads (default 1: fastest on small shared machines)", 1, type=int),
)


def training(config: TrainConfig) -> list[Option]:
    """Every :class:`TrainConfig` field, defaults from ``config``."""
    return [
        setting(config, "eps", "L-inf radius of the training attack ([0, 1] images); 0 = plain training"),
        setting(config, "steps", "PGD steps of the training attack", flag="--train-steps"),
        setting(config, "alpha", "PGD step size (default 2.5*eps/steps)"),
        setting(config, "random_start", "start PGD at the clean image, not a random point"),
        setting(config, "epochs", "training epochs"),
        setting(config, "lr", "learning rate (cosine-annealed per step)"),
        setting(config, "optimizer", "sgd (Nesterov, momentum 0.9) or adam", choices=OPTIMIZERS),
        setting(config, "weight_decay", "weight decay"),
        setting(config, "batch_size", "global batch (split across torchrun processes)"),
        setting(config, "clean_weight", "mix in clean cross-entropy with this weight"),
        setting(config, "trades_beta", "use the TRADES loss with this beta", metavar="BETA"),
        setting(config, "learn_act_scales", "also train activation-quantizer scales (default: keep the "
                "calibrated ones)"),
        setting(config, "seed", "seed of the shuffle and of the attack noise"),
    ]  # fmt: skip


def train_config(args: argparse.Namespace, base: TrainConfig) -> TrainConfig:
    """``base`` with the training options of ``args`` applied."""
    return base.replace(**values_for(args, TrainConfig))


def _selection(search: SearchConfig) -> list[Option]:
    """What ``search`` and ``validate-metric`` share: the model, budget, radius, candidates and data."""
    return [
        plain("--model", "zoo name or checkpoint path", required=True),
        plain("--budget", "avg-bits=4, bytes=N, kib=N or bops=N", required=True),
        setting(search, "eps", "L-inf radius the policy should resist"),
        setting(LipschitzSettings(), "estimate", "measured deviation (jacobian), the data-free bound (spectral) or "
                "the measured robust-loss increase (loss)", choices=ESTIMATES),
        setting(LipschitzSettings(), "measured_top_k", "measure the knapsack's K best policies on the held-out "
                "images and keep the most robust"),
        plain("--bits", "candidate weight bit widths (default 2 3 4 5 6 8)", type=int, nargs="+"),
        plain("--scalings", "candidate scaling rules (default max percentile mse)", nargs="+"),
        plain("--granularities", "candidate granularities (default per_tensor per_channel)", nargs="+"),
        plain("--act-bits", "input activation widths crossed with every candidate, quantized at the producer as "
              "FINN needs (default: none, or 2 3 4 8 with a bops budget or --target finn)", type=int, nargs="+"),
        setting(search, "target", "generic, or finn: every layer an integer input of <= 8 bits", choices=TARGETS),
        plain("--calib-images", "held-out (val) images for scoring", 256, type=int),
        setting(search, "val_images", "other val images for the comparison with uniform (0 = skip)"),
        setting(search, "seed", "seed of every random draw"),
        setting(search, "warm_start", "measure every held-out policy cold: no other policy's adversarial examples "
                "replayed first"),
        setting(search, "device"),
        *DATA,
    ]  # fmt: skip


def _model_commands() -> dict[str, list[Option]]:
    """Training, fine-tuning and quantizing a model."""
    train, tune, ev = TrainConfig(), TrainConfig.finetuning(), EvalConfig()
    resume = plain("--resume", "continue from <out>.train-state.pt", action="store_true")
    quantized = "quantized checkpoint from `aq-brevitas quantize`"
    return {
        "train": [
            plain("--arch", "small_cnn, vgg_bn, small_resnet or tfc", required=True),
            plain("--out", "checkpoint path (.pt); a .json sidecar is written beside it", required=True),
            *(o for o in training(train) if o.dest != "learn_act_scales"),
            plain("--train-images", "train on a seeded subset of N training images (default: all)", type=int),
            resume,
            plain("--test-images", "test images for the final measurement (default: all)", type=int),
            plain("--eval-eps", "PGD radius of the final measurement (default: --eps, or 0.1)", type=float),
            setting(ev, "pgd_steps", "PGD steps of the final measurement"),
            *DATA,
        ],
        "finetune": [
            plain("--model", quantized, required=True),
            plain("--out", "fine-tuned checkpoint path (.pt)", required=True),
            *training(tune),
            plain("--train-images", "fine-tune on a seeded subset of N training images (default: all)",
                  type=int),
            resume,
            *DATA,
        ],
        "quantize": [
            plain("--model", "float zoo name or checkpoint path; a quantized checkpoint is re-bitted "
                  "(apply_policy: layers the policy names change, the rest keep their quantizers)", required=True),
            plain("--policy", "policy JSON (schema aq-brevitas/policy/v1)", required=True),
            plain("--out", "quantized checkpoint path (.pt)", required=True),
            plain("--calib-images", "training images for activation calibration (0 = none)", 512, type=int),
            plain("--fold-bn", "fold BatchNorm into the preceding conv first", action="store_true"),
            plain("--bias-correction", "run Brevitas bias correction after calibration", action="store_true"),
            plain("--allow-partial", "keep layers the policy does not cover (no entry, no default) in float "
                  "instead of refusing", action="store_true"),
            plain("--target", "generic, or finn: refuse what FINN cannot build and lay the quantizers out as FINN "
                  "does (average pools, re-quantized adds, one quantizer per reader)", "generic", choices=TARGETS),
            plain("--seed", "seed of the calibration subset", 0, type=int),
            *DATA,
        ],
    }  # fmt: skip


def _measure_commands() -> dict[str, list[Option]]:
    """Measuring models: robustness, scores, the uniform-quantization study."""
    ev = EvalConfig()
    model = plain("--model", "zoo name, float checkpoint or quantized checkpoint", required=True)
    return {
        "evaluate": [
            model,
            setting(ev, "eps", "L-inf radii on [0, 1] images"),
            setting(ev, "pgd_steps", "PGD steps"),
            setting(ev, "pgd_restarts", "PGD random restarts"),
            setting(ev, "suite", "attack suite run at every eps; the robust figure is the per-image worst case"),
            setting(ev, "suite_steps", "APGD iterations of the suite"),
            setting(ev, "suite_queries", "Square queries of the suite"),
            setting(ev, "autoattack", "also run AutoAttack: standard = the reference (100 iterations, Square "
                    "5,000 queries; slow on CPU), torchattacks = the library's shortened one; bare flag: "
                    "standard", nargs="?", const="standard"),  # fmt: skip
            setting(ev, "gradient_free", "skip the Square attack check"),
            setting(ev, "gradient_free_images", "images for the Square attack check"),
            plain("--split", "test (default, for reporting), val or train", "test"),
            plain("--images", "evaluate on a seeded subset of N images of --split (default: all)", type=int),
            setting(ev, "seed", "seed of the subset and of the attacks"),
            setting(ev, "device"),
            plain("--report", "write the report as JSON"),
            plain("--plot", "write accuracy-vs-eps plot (PNG)"),
            *DATA,
        ],
        "score": [
            plain("--model", "zoo name or checkpoint path", required=True),
            plain("--split", "images to score on (default: val, never test)", "val"),
            plain("--images", "number of images of --split", 256, type=int),
            plain("--seed", "seed of the subset and the power iterations", 0, type=int),
            plain("--json", "write the scores as JSON"),
            plain("--plot", "write a bar chart (PNG/SVG/PDF)"),
            *DATA,
        ],
        "study": [
            plain("--models", "zoo names or checkpoints", ["cnn-plain", "cnn-pgd"], nargs="+"),
            plain("--bits", "uniform weight bit widths", [8, 6, 4, 3, 2], type=int, nargs="+"),
            plain("--eps", "L-inf radius of the PGD evaluation", 0.1, type=float),
            setting(ev, "pgd_steps", "PGD steps of the evaluation"),
            plain("--test-images", "test images (default: all 10k)", type=int),
            plain("--calib-images", "training images for activation calibration", 512, type=int),
            plain("--seed", "seed of the subsets and of PGD", 0, type=int),
            plain("--out", "write OUT.json, OUT.md and OUT.png"),
            *DATA,
        ],
    }  # fmt: skip


def _search_commands() -> dict[str, list[Option]]:
    """Searching a policy, and checking the bound it is searched on."""
    search = SearchConfig()
    return {
        "search": [
            *_selection(search),
            setting(search, "method", choices=METHODS),
            setting(search, "refine", "re-rank the top-5 knapsack policies and run coordinate descent on the "
                    "whole-network bound (off by default, see docs/method.md)"),
            plain("--compare", "run every method and print them side by side", action="store_true"),
            plain("--cache-dir", "folder of held-out measurements, read and written, so a rerun re-measures "
                  "nothing it measured (default: cache/ beside --out; none without --out)"),
            plain("--out", "write the policy JSON"),
            plain("--plot", "write the per-layer policy chart"),
        ],
        "pareto": [
            *[o for o in _selection(search) if o.flag != "--budget"],
            plain("--budget", "comma-separated budgets of one kind (default: the BOPs of uniform w_b a_b for "
                  "each b of --widths)"),
            plain("--widths", "bit widths b whose uniform w_b a_b BOPs are the budgets when --budget is not "
                  "given", [2, 3, 4, 5, 8], type=int, nargs="+"),
            plain("--methods", "methods to sweep", list(PARETO_METHODS), nargs="+", choices=PARETO_METHODS),
            setting(search, "pgd_steps", "PGD steps joined to the fast suite in each point's robust accuracy"),
            plain("--workers", "processes the points are measured on (the results are the same; 2 on a 2-core "
                  "machine)", 1, type=int),
            plain("--cache-dir", "folder of measured points, read and written, so a killed sweep resumes "
                  "(default: cache/ beside --out; none without --out)"),
            plain("--out", "write OUT.json, OUT.md and OUT.png"),
        ],
        "validate-metric": [
            *_selection(search),
            plain("--n", "number of random policies", 20, type=int),
            plain("--tolerance", "relative cost tolerance around the budget", 0.05, type=float),
            setting(search, "pgd_steps", "PGD steps of each policy's evaluation"),
            plain("--out", "write OUT.json and OUT.png (scatter)"),
        ],
    }  # fmt: skip


# RunConfig fields set by other options: --data-dir (in DATA), --mean/--std (normalization).
NOT_OPTIONS = ("data_dir", "normalization")


def normalization_of(args: argparse.Namespace) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` from ``--mean``/``--std`` (None when neither is given); :class:`ConfigError`
    when only one is given or their lengths differ."""
    mean, std = getattr(args, "mean", None), getattr(args, "std", None)
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        given, missing = ("--mean", "--std") if std is None else ("--std", "--mean")
        raise ConfigError(f"{given} is given without {missing}", "pass both, e.g. --mean 0.286 --std 0.353")
    if len(mean) != len(std):
        raise ConfigError(
            f"--mean has {len(mean)} value(s) but --std {len(std)}",
            "give as many --std values as --mean values (one, or one per input channel)",
        )
    return tuple(mean), tuple(std)


def _delivery_commands() -> dict[str, list[Option]]:
    """Exporting, the whole job, the shipped models."""
    run = RunConfig()
    quantized = "quantized checkpoint from `aq-brevitas quantize`"
    return {
        "export": [
            plain("--model", f"{quantized} or `finetune`", required=True),
            plain("--format", "qonnx (FINN), finn (qonnx plus FINN's own front end and estimates; needs the [finn] extra) or qcdq (onnxruntime)", "qonnx", choices=["qonnx", "finn", "qcdq"]),
            plain("--out", "ONNX file to write", required=True),
            plain("--images", "real test images for the parity check", 8, type=int),
            plain("--tol", "max allowed |ONNX - PyTorch| on the logits, relative to max(1, max |logit|) "
                  "(default 1e-5)", type=float),
            *DATA,
        ],
        "run": [
            plain("--model", "float zoo name or checkpoint", required=True),
            plain("--out", "output directory (created; re-running skips stages whose settings, inputs and "
                  "outputs are unchanged)", required=True),
            *(setting(run, f.name) for f in dataclasses.fields(RunConfig) if f.name not in NOT_OPTIONS),
            plain("--mean", "the model expects inputs normalised as (x - mean) / std: one mean, or one per "
                  "input channel (dim 1); data and --eps stay in [0, 1]", type=float, nargs="+"),
            plain("--std", "the std of that normalisation, as many values as --mean", type=float, nargs="+"),
            plain("--force", "redo every stage, fine-tuning from scratch", action="store_true"),
            *DATA,
        ],
        "zoo": [],
    }  # fmt: skip


def command_options() -> dict[str, list[Option]]:
    """Each subcommand's options, in the order ``--help`` lists them."""
    return {**_model_commands(), **_measure_commands(), **_search_commands(), **_delivery_commands()}


# -- building a subcommand's parser ---------------------------------------------------------------------
def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    """Add ``options`` to ``parser``, in the order ``--help`` lists them."""
    for o in options:
        parser.add_argument(o.flag, **o.kwargs)
