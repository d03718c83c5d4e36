"""Reference models for 1×28×28 inputs (Fashion-MNIST / MNIST).

They are ordinary ``nn.Module``s written the way users write theirs -- not ``nn.Sequential`` chains --
so that nothing in the library can come to rely on their structure. The library works on any
module; these only feed the zoo, the tests and the demo.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .classifier import unwrap_parallel
from .errors import ModelError

INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10


def _classifier_head(net: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """flatten -> fc1 -> ReLU -> fc2, the head both zoo CNNs share (their checkpoints name fc1, fc2)."""
    return net.fc2(F.relu(net.fc1(torch.flatten(features, 1))))


class SmallCNN(nn.Module):
    """conv16-relu-pool, conv32-relu-pool, fc128, fc10 (the prototype net of docs/method.md)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return _classifier_head(self, F.max_pool2d(F.relu(self.conv2(x)), 2))


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class VGGBN(nn.Module):
    """A VGG-style net with BatchNorm and layers of comparable size (no single layer dominates)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.block1 = ConvBNReLU(1, 16)
        self.block2 = ConvBNReLU(16, 32)
        self.block3 = ConvBNReLU(32, 32)
        self.block4 = ConvBNReLU(32, 64)
        self.fc1 = nn.Linear(64 * 3 * 3, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.block1(x), 2)  # 14
        x = F.max_pool2d(self.block3(self.block2(x)), 2)  # 7
        return _classifier_head(self, F.max_pool2d(self.block4(x), 2))  # 3x3 maps


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A small ResNet: a stem, two residual stages (the second strided), global pooling, fc."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


class TFC(nn.Module):
    """FINN's TFC: an MLP with three hidden layers of 64 units, each Linear -> BatchNorm -> ReLU.

    FINN's first example (``finn-examples``' ``tfc-w1a1``); 59k weights, fc1 holding 85 % of them.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(INPUT_SHAPE[1] * INPUT_SHAPE[2], hidden, bias=False)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, hidden, bias=False)
        self.bn2 = nn.BatchNorm1d(hidden)
        self.fc3 = nn.Linear(hidden, hidden, bias=False)
        self.bn3 = nn.BatchNorm1d(hidden)
        self.fc4 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.fc1(torch.flatten(x, 1))))
        x = F.relu(self.bn2(self.fc2(x)))
        return self.fc4(F.relu(self.bn3(self.fc3(x))))


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "small_cnn": SmallCNN,
    "vgg_bn": VGGBN,
    "small_resnet": SmallResNet,
    "tfc": TFC,
}


def build_model(arch: str) -> nn.Module:
    """Instantiate a reference architecture by name."""
    try:
        return ARCHITECTURES[arch]()
    except KeyError:
        raise ModelError(
            f"unknown architecture {arch!r}", f"use one of {', '.join(sorted(ARCHITECTURES))}"
        ) from None


ZOO_DIR = __import__("pathlib").Path(__file__).parent / "zoo"


def zoo_names() -> list[str]:
    """Names of the shipped checkpoints (``aq_brevitas/zoo/<name>.pt``)."""
    # a run training into the zoo keeps <name>.train-state.pt beside it: not a model
    return sorted(p.stem for p in ZOO_DIR.glob("*.pt") if not p.stem.endswith(".train-state"))


def resolve_model_path(name_or_path: str):
    """A zoo name or a path to a checkpoint written by :func:`save_model`."""
    from pathlib import Path

    p = Path(name_or_path)
    if p.suffix == "" and (ZOO_DIR / f"{name_or_path}.pt").is_file():
        return ZOO_DIR / f"{name_or_path}.pt"
    if p.is_file() or p.suffix:
        return p
    raise ModelError(
        f"{name_or_path!r} is neither a zoo model nor a file",
        f"use a checkpoint path or one of {', '.join(zoo_names())}",
    )


def check_finite(model: nn.Module, source: str = "model") -> None:
    """Refuse a model whose parameters or buffers hold NaN or Inf."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ModelError(
                f"{source}: tensor {name} holds NaN/Inf values", "retrain or restore a good checkpoint"
            )


def save_model(model: nn.Module, path, meta: dict) -> None:
    """Save a float model's ``state_dict`` plus a JSON sidecar (``meta`` must name ``arch``); a
    ``DataParallel`` model is saved as the network it holds (keys without ``module.``)."""
    from .storage import save_checkpoint

    if "arch" not in meta:
        raise ModelError("model metadata lacks 'arch'", "pass meta={'arch': <name>, ...}")
    model = unwrap_parallel(model)  # a DataParallel's keys would all carry "module."
    save_checkpoint(path, {"state_dict": flush_denormals(model.state_dict())}, meta=meta)


def flush_denormals(state_dict: dict) -> dict:
    """Store float values below the normal range as 0.

    Adam with weight decay leaves many weights denormal (|w| < 1.2e-38). They change no output
    measurably, but CPU kernels slow down ~5x on them unless ``torch.set_flush_denormal(True)``.
    """
    out = {}
    for k, v in state_dict.items():
        if torch.is_tensor(v) and v.is_floating_point():
            tiny = torch.finfo(v.dtype).tiny
            v = torch.where(v.abs() < tiny, torch.zeros_like(v), v)
        out[k] = v
    return out


def load_float_model(name_or_path: str) -> tuple[nn.Module, dict]:
    """Load a float reference model from the zoo or a checkpoint; returns ``(model.eval(), meta)``."""
    from .errors import CheckpointError
    from .storage import load_checkpoint, read_sidecar

    path = resolve_model_path(name_or_path)
    state = load_checkpoint(path)
    meta = read_sidecar(path)
    if "state_dict" not in state or not isinstance(state["state_dict"], dict):
        raise CheckpointError(
            f"checkpoint {path} has no 'state_dict' entry",
            "save it with aq_brevitas.models.save_model or `aq-brevitas train`",
        )
    if "arch" not in meta:
        raise CheckpointError(
            f"checkpoint {path} has no sidecar naming its architecture",
            f'add {path.with_suffix(".json")} with {{"arch": ...}}',
        )
    model = build_model(meta["arch"])
    load_weights(model, state["state_dict"], path, f"architecture {meta['arch']!r}")
    return model.eval(), meta


PARALLEL_PREFIX = "module."  # what nn.DataParallel / DistributedDataParallel put before every key


def without_parallel_prefix(state_dict: dict, model: nn.Module) -> dict:
    """``state_dict`` with the ``module.`` prefix of a ``DataParallel`` checkpoint removed, when every
    key carries it and ``model``'s own keys do not (torch's ``consume_prefix_in_state_dict_if_present``);
    anything else as it is."""
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    own = model.state_dict()
    if not state_dict or not all(str(k).startswith(PARALLEL_PREFIX) for k in state_dict):
        return state_dict
    if own and all(k.startswith(PARALLEL_PREFIX) for k in own):
        return state_dict
    stripped = dict(state_dict)
    consume_prefix_in_state_dict_if_present(stripped, PARALLEL_PREFIX)
    return stripped


def _some(keys: list[str], n: int = 3) -> str:
    """The first ``n`` keys and how many more: a short form for an error line."""
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def state_dict_mismatch(model: nn.Module, state_dict: dict) -> tuple[str, str | None, str]:
    """``(what differs, prefix, side)`` between ``model``'s keys and a checkpoint's, in short form:
    missing and unexpected keys (first few and a count) and shapes that differ; ``prefix`` is a key
    prefix every key of ``side`` (``"checkpoint"`` or ``"model"``) carries and the other lacks, else None."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {str(k): tuple(v.shape) if torch.is_tensor(v) else None for k, v in state_dict.items()}
    missing, unexpected = [k for k in own if k not in got], [k for k in got if k not in own]  # in file order
    shapes = [f"{k} {got[k]} vs {own[k]}" for k in own if k in got and got[k] != own[k]]
    parts = [f"{len(missing)} missing keys ({_some(missing)})"] if missing else []
    parts += [f"{len(unexpected)} unexpected keys ({_some(unexpected)})"] if unexpected else []
    parts += [f"{len(shapes)} shapes differ ({_some(shapes, 2)}: checkpoint vs model)"] if shapes else []
    for extra, short, side in ((unexpected, missing, "checkpoint"), (missing, unexpected, "model")):
        prefix = extra[0].split(".")[0] + "." if extra and short else ""
        if (
            prefix
            and all(k.startswith(prefix) for k in extra)
            and {k[len(prefix) :] for k in extra} == set(short)
        ):
            return "; ".join(parts), prefix, side
    return "; ".join(parts), None, ""


def load_weights(model: nn.Module, state_dict: dict, path, what: str) -> None:
    """``load_state_dict`` with a one-line error naming the file and, in short form, the keys and shapes
    that differ; then refuse NaN/Inf weights. A checkpoint saved from a ``DataParallel`` model (every
    key prefixed ``module.``) loads into the plain model."""
    from .errors import CheckpointError

    state_dict = without_parallel_prefix(state_dict, model)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        diff, prefix, side = state_dict_mismatch(model, state_dict)
        if prefix is not None:
            raise CheckpointError(
                f"checkpoint {path} does not fit its {what}: {diff}; every key of the {side} starts with {prefix!r}",
                f"strip it: torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(state_dict, {prefix!r})",
            ) from None
        raise CheckpointError(
            f"checkpoint {path} does not fit its {what}: {diff or str(exc).splitlines()[0][:100]}",
            "re-create it, or pass the checkpoint that matches",
        ) from None
    check_finite(model, str(path))
