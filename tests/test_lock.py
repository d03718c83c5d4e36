"""The venv holds exactly the tested set of packages that requirements/lock.txt pins."""

import re
from importlib import metadata

from conftest import REPO

LOCK = REPO / "requirements" / "lock.txt"
# What a fresh machine must not resolve on its own: the numerics, the exporters and the tools.
MUST_PIN = (
    "torch brevitas onnx onnxruntime onnxscript qonnx numpy scipy protobuf torchattacks torchao "
    "matplotlib tqdm pytest hypothesis ruff"
).split()


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"lock line {line!r} is not an exact pin"
            pins[_norm(name)] = version
    return pins


def test_lock_pins_the_fragile_packages():
    missing = [n for n in MUST_PIN if _norm(n) not in _locked()]
    assert not missing, f"requirements/lock.txt does not pin {missing}: run `make lock`"


def test_venv_matches_lock():
    differ = {}
    for name, version in _locked().items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have != version:
            differ[name] = (version, have)
    assert not differ, f"installed versions differ from the lock (locked, installed): {differ}"
