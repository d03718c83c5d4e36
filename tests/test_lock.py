"""The venv holds exactly the tested set of packages that requirements/lock.txt pins."""

import re
import subprocess
import sys
import tomllib
from importlib import metadata

from conftest import REPO

LOCK = REPO / "requirements" / "lock.txt"
# What a fresh machine must not resolve on its own: the numerics, the exporters and the tools.
MUST_PIN = (
    "torch brevitas onnx onnxruntime onnxscript qonnx numpy scipy protobuf torchattacks torchao "
    "matplotlib tqdm pytest hypothesis ruff finn-plus"
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


# What `pip check` prints on the locked venv, line for line (the Makefile's PIP_CHECK_EXPECTED holds the
# same): torchattacks 3.5.1 declares requests and torchvision and imports neither; finn-plus 1.6.1 is
# installed with --no-deps (its brevitas==0.13.0 pin needs setuptools<70, which torch 2.13.0+cpu forbids)
# and runs with the lock's onnx, onnxruntime, protobuf, matplotlib and bitstring (tests/test_finn.py).
PIP_CHECK_EXPECTED = {
    "finn-plus 1.6.1 has requirement bitstring<4.4.0,>=4.3.1, but you have bitstring 5.0.0.",
    "finn-plus 1.6.1 has requirement brevitas==0.13.0, but you have brevitas 0.13.4.",
    "finn-plus 1.6.1 has requirement matplotlib<3.11.0,>=3.10.9, but you have matplotlib 3.11.2.",
    "finn-plus 1.6.1 has requirement onnx==1.21.0, but you have onnx 1.23.2.",
    "finn-plus 1.6.1 has requirement onnxruntime==1.25.1, but you have onnxruntime 1.32.0.",
    "finn-plus 1.6.1 has requirement protobuf==5.29.6, but you have protobuf 7.36.2.",
    "torchattacks 3.5.1 requires requests, which is not installed.",
    "torchattacks 3.5.1 requires torchvision, which is not installed.",
}


def test_pip_check_prints_exactly_the_known_lines():
    out = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120
    ).stdout
    assert set(out.splitlines()) == PIP_CHECK_EXPECTED, out
    make = (REPO / "Makefile").read_text()
    block = make.split("define PIP_CHECK_EXPECTED\n", 1)[1].split("\nendef", 1)[0]
    assert set(block.splitlines()) == PIP_CHECK_EXPECTED, "Makefile's PIP_CHECK_EXPECTED differs"


def test_finn_extra_is_locked():
    """finn-plus and every runtime requirement the [finn] extra declares are pinned in the lock."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["finn"]
    names = [_norm(re.split(r"[\[<>=!~ ]", req, maxsplit=1)[0]) for req in extra]
    missing = [n for n in ["finn-plus", *names] if n not in _locked()]
    assert not missing, f"requirements/lock.txt does not pin {missing}"
