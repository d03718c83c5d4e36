"""The one place for files: atomic writes, checkpoints and their JSON sidecars.

Checkpoints hold tensors and plain containers only and are always read with
``torch.load(weights_only=True)``, so a file carrying a pickled object is refused, never executed.
Every write goes to a temporary file in the destination directory and is renamed into place, so an
interrupted run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError

SIDECAR_SUFFIX = ".json"


def check_output_file(
    path: str | os.PathLike[str], option: str | None = None, *, suffix: str = "", probe: bool = True
) -> Path:
    """Refuse an output file path that cannot be written, before any work is done; return its directory.

    The CLI calls this for every output option up front (``option`` names the flag in the message), so a
    bad path fails at once rather than after the computation. ``probe`` creates and removes a temporary
    file in the directory, which catches read-only mounts and /proc that permission bits do not show.
    """
    final = Path(path)
    parent = final.parent if str(final.parent) else Path(".")
    what = f"{option} {final}" if option else str(final)
    other = f"another {option}" if option else "another output path"
    if final.is_dir():
        raise ConfigError(
            f"{what} is an existing directory, not a file name",
            f"name a file inside it, e.g. {final / ('out' + (suffix or final.suffix))}",
        )
    if not parent.is_dir():
        raise ConfigError(
            f"output directory {parent} of {what} does not exist", f"create it first or choose {other}"
        )
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"output directory {parent} of {what} is not writable", f"choose {other}")
    if probe:
        try:
            with tempfile.TemporaryFile(dir=parent):
                pass
        except OSError as exc:
            raise ConfigError(
                f"cannot write in {parent} ({exc.strerror}) for {what}", f"choose {other}"
            ) from None
    return parent


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    final = Path(path)
    parent = check_output_file(final, probe=False)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise ConfigError(
            f"cannot write in {parent} ({exc.strerror})", "choose a writable output location"
        ) from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give outputs the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise ConfigError(
                f"could not write {path}: {exc.strerror}", "free disk space or choose another --out"
            ) from exc


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_with(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Let ``writer`` produce a file at a temporary path, then rename it onto ``path``.

    A failing writer (a full disk, an interrupt) leaves neither a partial file nor the temporary one.
    """
    with atomic_path(path) as tmp:
        try:
            writer(tmp)
        except OSError as exc:
            raise ConfigError(
                f"could not write {path}: {exc.strerror or exc}",
                "free disk space or choose another output location",
            ) from None


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p.with_suffix(SIDECAR_SUFFIX) if p.suffix != SIDECAR_SUFFIX else p


def save_checkpoint(
    path: str | os.PathLike[str], payload: dict[str, Any], meta: dict[str, Any] | None = None
) -> None:
    """Save ``payload`` (tensors, numbers, strings, lists, dicts) atomically, plus an optional sidecar."""
    import torch

    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())
    if meta is not None:
        atomic_write_json(sidecar_path(path), meta)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; any problem is a one-line :class:`CheckpointError`."""
    import pickle

    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(
            f"checkpoint {p} does not exist", "check the path, or pass a zoo name (see `aq-brevitas zoo`)"
        )
    if p.stat().st_size == 0:
        raise CheckpointError(
            f"checkpoint {p} is empty", "re-create it; the run that wrote it did not finish"
        )
    if p.suffix.lower() == ".json":
        raise CheckpointError(
            f"{p} is a JSON file (a policy or a report), not a model checkpoint",
            "pass a .pt checkpoint written by aq-brevitas (train, quantize, finetune) or a zoo name",
        )
    try:
        with warnings.catch_warnings():
            # A non-torch file reads as an odd pickle protocol; the error below says so in one line.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        if "Weights only load failed" in first or "weights_only" in str(exc):
            raise CheckpointError(
                f"checkpoint {p} contains pickled Python objects and was refused (weights_only=True)",
                "save only tensors/state_dicts, e.g. with `aq-brevitas train` or aq_brevitas.storage.save_checkpoint",
            ) from None
        raise CheckpointError(
            f"checkpoint {p} is not a readable torch checkpoint ({first})", "re-create it"
        ) from None
    except Exception as exc:  # a foreign file can make the unpickler raise anything
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {p} is truncated or not a torch checkpoint ({first})", "re-create it"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint {p} holds a {type(obj).__name__}, not a dict",
            "save a dict with a 'state_dict' entry",
        )
    return obj


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist", "check the path")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{what} {p} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
            "fix the JSON syntax",
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {p} is not UTF-8 text", "pass a JSON text file") from None


def read_sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
    side = sidecar_path(path)
    if not side.is_file():
        return {}
    meta = read_json(side, "checkpoint sidecar")
    if not isinstance(meta, dict):
        raise CheckpointError(f"sidecar {side} is not a JSON object", "delete it or re-create the checkpoint")
    return meta
