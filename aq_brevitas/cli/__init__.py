"""``aq-brevitas``: a thin argparse front end over the library.

The options come from the config dataclasses (:mod:`aq_brevitas.cli.options`), so each word means one
thing in every subcommand and the defaults are the API's; each ``cmd_*`` loads, calls the library and
prints. Heavy modules (torch, Brevitas, torchattacks) are imported inside the subcommand that needs
them, so ``aq-brevitas --help`` answers at once. Every :class:`~aq_brevitas.errors.AqError` becomes
one line on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Sequence

from ..errors import AqError
from .commands import (
    cmd_evaluate,
    cmd_finetune,
    cmd_quantize,
    cmd_run,
    cmd_score,
    cmd_study,
    cmd_train,
    cmd_zoo,
)
from .delivery import cmd_export, cmd_pareto, cmd_search, cmd_validate_metric
from .options import add_options, command_options

EXIT_USER_ERROR = 2

# The files each command writes: (argparse dest, option, example suffix). ``run --out`` is a directory
# and is checked by the pipeline. ``--plot`` paths also need an extension matplotlib can write.
OUTPUT_OPTIONS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "train": (("out", "--out", ".pt"),),
    "evaluate": (("report", "--report", ".json"), ("plot", "--plot", ".png")),
    "score": (("json", "--json", ".json"), ("plot", "--plot", ".png")),
    "quantize": (("out", "--out", ".pt"),),
    "finetune": (("out", "--out", ".pt"),),
    "export": (("out", "--out", ".onnx"),),
    "search": (("out", "--out", ".json"), ("plot", "--plot", ".png")),
}
# Commands whose --out is a prefix: they write OUT + each suffix.
OUTPUT_PREFIXES: dict[str, tuple[str, ...]] = {
    "study": (".json", ".md", ".png"),
    "validate-metric": (".json", ".png"),
    "pareto": (".json", ".md", ".png"),
}


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse unwritable output paths before any work, so a typo never costs a whole run."""
    from ..storage import check_output_file, sidecar_path

    for dest, option, suffix in OUTPUT_OPTIONS.get(args.command, ()):
        path = getattr(args, dest, None)
        if path is None:
            continue
        if dest == "plot":
            from ..plots import check_plot_path

            check_plot_path(path, option)
        else:
            check_output_file(path, option, suffix=suffix)
        if suffix == ".pt":  # checkpoints get a JSON sidecar beside them
            check_output_file(sidecar_path(path), f"{option} sidecar", suffix=".json", probe=False)
    prefix = getattr(args, "out", None) if args.command in OUTPUT_PREFIXES else None
    if prefix is not None:
        for suffix in OUTPUT_PREFIXES[args.command]:
            check_output_file(prefix + suffix, "--out", suffix=suffix)


Handler = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, Handler]] = {
    "train": ("train a float reference model, plainly or with PGD (Madry)", cmd_train),
    "evaluate": ("robustness report: clean, FGSM, PGD-k per eps, Square, masking checklist", cmd_evaluate),
    "score": ("per-layer Lipschitz scores: operator norm L, gains Λ, input norm A", cmd_score),
    "quantize": ("apply a policy JSON: swap layers for Brevitas ones, calibrate, save", cmd_quantize),
    "finetune": ("PGD fine-tune a quantized model (QAT); works under torchrun", cmd_finetune),
    "study": ("claim 1: plain vs PGD-trained models under uniform quantization", cmd_study),
    "search": ("search a per-layer policy under a budget (lipschitz, hessian, ans, uniform)", cmd_search),
    "validate-metric": (
        "Spearman rank check: does the bound order random equal-cost policies like their measured robust error?",
        cmd_validate_metric,
    ),
    "pareto": (
        "robust accuracy against BOPs/KiB for every method over a sweep of budgets, with a plot; "
        "resumable, works under torchrun",
        cmd_pareto,
    ),
    "export": (
        "export a quantized checkpoint to QONNX (FINN) or QCDQ (onnxruntime), parity-checked",
        cmd_export,
    ),
    "run": (
        "the whole job: score, search, quantize, fine-tune, evaluate, export, report (resumable)",
        cmd_run,
    ),
    "zoo": ("list the shipped models and their measured accuracy", cmd_zoo),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``aq-brevitas`` parser: one subparser per entry of :data:`COMMANDS`, options from
    :func:`~aq_brevitas.cli.options.command_options`."""
    # No prefix matching: an old word that happens to start a current option must not take its meaning.
    parser = argparse.ArgumentParser(
        prog="aq-brevitas",
        description="Layer-wise adversarial-aware quantization for Brevitas.",
        allow_abbrev=False,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    options = command_options()
    for name, (summary, handler) in COMMANDS.items():
        p = sub.add_parser(
            name, help=summary, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
        )
        add_options(p, options[name])
        p.set_defaults(func=handler)
    return parser


def close_options(command: str | None, words: Sequence[str]) -> list[str]:
    """The options of ``command`` an unknown option in ``words`` most likely meant: the renamed ones
    that keep its word (``--steps`` -> ``--train-steps``, ``--pgd-steps``), else near spellings."""
    if command is None:
        return []
    flags = [o.flag for o in command_options()[command] if o.flag.startswith("--")]
    out: list[str] = []
    for word in (w.split("=")[0] for w in words if w.startswith("--")):
        stem = word[2:]
        kept = [f for f in flags if stem in f[2:].split("-") or f[2:].startswith(f"{stem}-")]
        out += kept or difflib.get_close_matches(word, flags, n=2, cutoff=0.75)
    return list(dict.fromkeys(out))[:4]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would print the top-level usage; say it in one line, for the command
        where = f"aq-brevitas {args.command}" if args.command else "aq-brevitas"
        near = close_options(args.command, unknown)
        hint = f"did you mean {' or '.join(near)}? " if near else ""
        print(
            f"aq-brevitas: error: {where} does not take {' '.join(unknown)} -- fix: {hint}see `{where} --help`",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        check_outputs(args)
        return int(args.func(args) or 0)
    except AqError as exc:
        if args.debug:
            raise
        print(f"aq-brevitas: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(
            "aq-brevitas: interrupted; completed outputs are intact, partial files were removed",
            file=sys.stderr,
        )
        return 130
