"""What the stages of one run share (:class:`RunContext`) and the model variants it reports on."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, ModelError, a_type
from ..storage import check_output_file
from .config import RunConfig, check_config
from .data import RunInputs, prepare_data
from .stagelog import StageLog

if TYPE_CHECKING:
    from torch import nn

    from ..budget import Budget
    from ..policy import LayerwisePolicy


@dataclass(frozen=True)
class Variant:
    """One quantized model of the run: its summary label and the names of its files."""

    key: str  # "aq-brevitas" or "uniform": the label in the summary
    stem: str  # of its checkpoints and robustness report: searched_ptq.pt, robustness_searched.json
    suffix: str  # of its policy, ONNX and export record: policy_uniform.json, model_uniform.onnx

    @property
    def policy_file(self) -> str:
        return f"policy{self.suffix}.json"

    def checkpoint(self, stage: str) -> list[str]:
        """The checkpoint of ``stage`` ("ptq" or "finetuned") and its sidecar (save_quantized's pair)."""
        return [f"{self.stem}_{stage}.pt", f"{self.stem}_{stage}.json"]

    @property
    def export_files(self) -> tuple[str, str]:
        return f"model{self.suffix}.onnx", f"export{self.suffix}.json"


VARIANTS = (Variant("aq-brevitas", "searched", ""), Variant("uniform", "uniform", "_uniform"))


def _check_out_dir(out: Path) -> None:
    """Refuse an --out that is a file or cannot be written, without creating anything."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file", "pass a directory (it is created if missing)")
    if out.is_dir():
        check_output_file(out / "stages.json", "--out", suffix=".json")
        return
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"cannot create output directory {out} ({parent} is not a writable directory)",
            "choose a writable --out",
        )


# -- the run context ----------------------------------------------------------------------------------------
@dataclass
class RunContext:
    """What every stage reads: the settings, the float model and the draws of its data
    (:class:`~aq_brevitas.pipeline.data.RunInputs`), the run folder and its stage log."""

    cfg: RunConfig
    out: Path
    name: str
    model: nn.Module
    budget: Budget
    data: RunInputs
    geometry: dict[str, Any]
    log: StageLog
    progress: bool
    identity: dict[str, Any]  # the float model's digest, the seed and the normalisation

    @property
    def eval_eps(self) -> tuple[float, ...]:
        return tuple(sorted({*map(float, self.cfg.eval_eps), float(self.cfg.eps)}))

    def reading(self, *parts: str) -> dict[str, Any]:
        """The identity plus the digest of each data ``part`` a stage reads ("calib", "test"...)."""
        return {**self.identity, **{f"data:{p}": self.data.digests[p] for p in parts}}

    @property
    def selection(self) -> dict[str, Any]:
        return {**self.reading("calib"), "calib_images": self.cfg.calib_images}

    @property
    def normalization(self) -> Any:
        return self.cfg.normalization

    @cached_property
    def policies(self) -> dict[str, LayerwisePolicy]:
        """The searched and the uniform policy, as the search stage wrote them."""
        from ..policy import LayerwisePolicy

        return {v.key: LayerwisePolicy.load(self.out / v.policy_file) for v in VARIANTS}

    def quantized(self, variant: Variant, stage: str) -> nn.Module:
        """The ``stage`` checkpoint ("ptq" or "finetuned") of ``variant``, rebuilt on the float model."""
        from ..quantization.checkpoint import load_quantized

        return load_quantized(self.out / variant.checkpoint(stage)[0], float_model=self.model)[0]

    def checkpoint_files(self, stage: str) -> dict[str, str]:
        """Every policy file and every ``stage`` checkpoint, as stage inputs."""
        names = [v.policy_file for v in VARIANTS] + [f for v in VARIANTS for f in v.checkpoint(stage)]
        return self.log.files(*names)


def make_context(
    model: nn.Module | str, out: Path, cfg: RunConfig, data: Any, force: bool, progress: bool
) -> RunContext:
    """Check everything, load the model and the data; only then create ``out``."""
    from torch import nn

    from ..models import load_float_model
    from ..nnutils import layer_geometry

    budget = check_config(cfg)
    _check_out_dir(out)
    if isinstance(model, str):
        float_model, name = load_float_model(model)[0], model
    elif isinstance(model, nn.Module):
        float_model, name = model, type(model).__name__  # in eval mode: run() holds it there
    else:
        raise ModelError(
            f"model is {a_type(model)}", "pass an nn.Module, a zoo name or a float checkpoint path"
        )
    inputs = prepare_data(float_model, data, cfg)
    geometry = layer_geometry(float_model, inputs.calib[0][:1])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create output directory {out} ({exc.strerror})", "choose a writable --out"
        ) from None
    from ..evaluate.cache import model_digest  # the evaluate package imports torch: not at CLI start

    identity = {"model": model_digest(float_model), "seed": cfg.seed, "normalization": cfg.normalization}
    return RunContext(
        cfg, out, name, float_model, budget, inputs, geometry, StageLog(out, force), progress, identity
    )
