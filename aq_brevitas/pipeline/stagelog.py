"""Records of resumable stages: which stage ran with which inputs and wrote which outputs.

:class:`StageLog` keeps them in ``stages.json`` inside a run folder, so a later run can skip a stage
whose settings, input files and outputs are unchanged, and say why it redoes one otherwise.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..storage import atomic_write_json, read_json


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _change(key: str, old: Any, new: Any) -> str:
    """How a changed stage input is named in "redoing: changed: …" (digests by what they identify)."""
    if key == "model":
        return "the model's weights"
    if key == "data":  # the description of the data a run read (source, shape, counts)
        return "the data"
    if key.startswith("data:"):
        return f"the {key[5:].replace('_', '-')} data"
    return f"{key} {_short(old)} -> {_short(new)}"


class StageLog:
    """``out/stages.json``: which stages are done with which inputs; deciding to skip, recording.

    A stage calls :meth:`start` (False: skip it, its outputs are current) and, once its outputs are
    written, :meth:`finish`. A stage that raises stays recorded as running with its inputs, which is
    how :attr:`interrupted` recognises the same stage cut off last time.
    """

    def __init__(self, out: Path, force: bool) -> None:
        self.out, self.manifest = out, out / "stages.json"
        self.done: dict[str, Any] = {} if force else self._read()
        self.skipped: list[str] = []
        self.interrupted = False  # the running stage was cut off last time with the same inputs
        self._started: dict[str, tuple[float, list[str]]] = {}

    def _read(self) -> dict[str, Any]:
        if not self.manifest.is_file():
            return {}
        try:
            done = read_json(self.manifest, "stage manifest")
        except ConfigError as exc:
            print(f"[run] {exc.problem}; redoing every stage", flush=True)
            return {}
        if not isinstance(done, dict) or not all(isinstance(r, dict) for r in done.values()):
            print(f"[run] stage manifest {self.manifest} is not a map of stage records; redoing every stage")
            return {}
        return done

    def files(self, *names: str) -> dict[str, str]:
        """Input files of a stage as ``{"file:name": digest}`` (they exist: an earlier stage wrote them)."""
        return {f"file:{n}": file_digest(self.out / n) for n in names}

    def _why_redo(self, name: str, inputs: dict[str, Any], outputs: list[str]) -> str | None:
        rec = self.done.get(name)
        if rec is None:
            return "not done yet"
        old = rec.get("inputs")
        if not isinstance(old, dict):
            return "its record names no inputs"
        changed = [k for k in sorted(set(old) | set(inputs)) if old.get(k) != inputs.get(k)]
        if changed:
            files = [k[5:] for k in changed if k.startswith("file:")]
            parts = [_change(k, old.get(k), inputs.get(k)) for k in changed if not k.startswith("file:")]
            parts += [f"input file(s) {', '.join(files)}"] if files else []
            return "changed: " + "; ".join(parts)
        if rec.get("status") != "done" or not isinstance(rec.get("outputs"), dict):
            return "it did not finish last time"
        for o in outputs:
            path = self.out / o
            if not path.is_file():
                return f"{o} is missing"
            if file_digest(path) != rec["outputs"].get(o):
                return f"{o} changed or is corrupt since it was written"
        return None

    def start(self, name: str, inputs: dict[str, Any], outputs: list[str]) -> bool:
        """True (and the stage recorded as running) when stage ``name`` must run; False to skip it."""
        inputs = json.loads(json.dumps(inputs))  # compare as stored (tuples become lists)
        reason = self._why_redo(name, inputs, outputs)
        if reason is None:
            self.skipped.append(name)
            print(f"[{name}] done already with these settings ({', '.join(outputs)}); skipping", flush=True)
            return False
        prev = self.done.get(name) or {}
        self.interrupted = prev.get("status") == "running" and prev.get("inputs") == inputs
        print(f"[{name}] ..." if name not in self.done else f"[{name}] redoing: {reason}", flush=True)
        self.done[name] = {"status": "running", "inputs": inputs}
        atomic_write_json(self.manifest, self.done)
        self._started[name] = (time.perf_counter(), outputs)
        return True

    def finish(self, name: str) -> None:
        """Record stage ``name`` as done, with a digest of each of its outputs."""
        t0, outputs = self._started.pop(name)
        self.done[name] = {
            "status": "done",
            "inputs": self.done[name]["inputs"],
            "outputs": {o: file_digest(self.out / o) for o in outputs},
            "seconds": time.perf_counter() - t0,
        }
        atomic_write_json(self.manifest, self.done)
        print(f"[{name}] done in {self.done[name]['seconds']:.0f} s", flush=True)
