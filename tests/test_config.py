"""The settings dataclasses: defaults, validation with one-line errors, JSON round trips, one
declaration of the input normalisation."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from aq_brevitas.config import AttackConfig, EvalConfig, InputNormalization, TrainConfig, config_or_default
from aq_brevitas.errors import ConfigError
from conftest import REPO


@pytest.mark.parametrize("cls", [AttackConfig, TrainConfig, EvalConfig])
def test_round_trip_through_json(cls):
    cfg = cls()
    back = cls.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and hash(back) == hash(cfg)
    with pytest.raises(ConfigError, match=rf"unknown {cls.__name__} setting\(s\) 'bogus'"):
        cls.from_dict({**cfg.to_dict(), "bogus": 1})


def test_config_module_is_light():
    """The CLI may build its parser from the configs without paying for torch."""
    code = "import sys, aq_brevitas.config; print([m for m in ('torch', 'brevitas', 'torchattacks') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def test_train_config_defaults_and_finetuning_preset():
    cfg = TrainConfig()
    assert (cfg.eps, cfg.steps, cfg.lr, cfg.optimizer, cfg.weight_decay, cfg.batch_size) == (
        0.1, 7, 0.05, "sgd", 5e-4, 128
    )  # fmt: skip
    ft = TrainConfig.finetuning(epochs=3)
    assert (ft.lr, ft.optimizer, ft.weight_decay, ft.learn_act_scales, ft.epochs) == (
        5e-4,
        "adam",
        0.0,
        False,
        3,
    )
    assert cfg.attack() == AttackConfig("pgd", 0.1, 7, None, True)
    norm = ((0.5,), (0.25,))
    assert TrainConfig(normalization=norm).attack() == AttackConfig("pgd", 0.1, 7, normalization=norm)
    assert TrainConfig(trades_beta=6.0, alpha=0.02).attack().name == "tpgd"
    assert not TrainConfig(eps=0.0).adversarial and not TrainConfig(steps=0).adversarial


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"eps": 1.5}, r"eps=1\.5 is outside \[0, 1\]"),
        ({"eps": float("nan")}, r"eps must be a number, got nan"),
        ({"epochs": 0}, r"bad training settings \(epochs=0"),
        ({"lr": "fast"}, r"bad training settings .*lr=fast"),
        ({"batch_size": 1.5}, r"bad training settings"),
        ({"clean_weight": 2}, r"clean_weight=2 is outside \[0, 1\]"),
        ({"alpha": -0.1}, r"alpha=-0\.1 is not a PGD step"),
        ({"optimizer": "lbfgs"}, r"unknown optimizer 'lbfgs'"),
        ({"trades_beta": -1}, r"trades_beta=-1 must be >= 0"),
        ({"weight_decay": -1}, r"weight_decay=-1 must be >= 0"),
        ({"seed": "0"}, r"seed must be an integer"),
    ],
)
def test_train_config_refuses_bad_values(changes, message):
    with pytest.raises(ConfigError, match=message) as err:
        TrainConfig().replace(**changes)
    assert "\n" not in str(err.value) and "-- fix:" in str(err.value)


def test_eval_config_normalises_and_refuses():
    cfg = EvalConfig(eps=(0.2, 0.05, 0.2), attacks=("PGD", "clean", "pgd"), normalization=([0.5], [0.25]))
    assert cfg.eps == (0.05, 0.2) and cfg.attacks == ("pgd", "clean")
    assert cfg.normalization == ((0.5,), (0.25,)) and EvalConfig(eps=0.1).eps == (0.1,)
    for changes, message in [
        ({"eps": ()}, "no eps given"),
        ({"eps": (0.1, "0.1")}, "eps must be a number"),
        ({"large_eps": 2}, "large_eps=2 is outside"),
        ({"attacks": ("clean", "cw")}, "unknown attack"),
        ({"pgd_steps": 0}, "pgd_steps must be an integer >= 1"),
        ({"limit": 0}, "limit must be positive"),
        ({"normalization": ((0.5,), (0.0,))}, "normalization"),
    ]:
        with pytest.raises(ConfigError, match=message):
            EvalConfig().replace(**changes)


def test_attack_config_and_config_or_default():
    assert AttackConfig("FGSM").name == "fgsm" and AttackConfig(steps=4, eps=0.1).step_size == pytest.approx(
        0.0625
    )
    with pytest.raises(ConfigError, match="unknown attack 'cw'"):
        AttackConfig("cw")
    with pytest.raises(ConfigError, match="queries must be an integer >= 1"):
        AttackConfig("square", queries=0)
    base = TrainConfig(epochs=2)
    assert config_or_default(None, TrainConfig()) == TrainConfig()
    assert config_or_default(base, TrainConfig()) is base
    with pytest.raises(ConfigError, match="config is an EvalConfig, not a TrainConfig"):
        config_or_default(EvalConfig(), TrainConfig())


@pytest.mark.parametrize("cls", [AttackConfig, TrainConfig, EvalConfig])
def test_normalization_is_declared_once(cls):
    """Every config takes normalization from InputNormalization: the same field, the same check, and
    keyword-only, so no positional argument lands in it."""
    assert issubclass(cls, InputNormalization)
    (own,) = [f for f in dataclasses.fields(cls) if f.name == "normalization"]
    (mixin,) = dataclasses.fields(InputNormalization)
    assert own is mixin and own.kw_only
    assert "normalization" not in cls.__dict__.get("__annotations__", {})  # not declared again
    assert cls(normalization=([0.5], [0.25])).normalization == ((0.5,), (0.25,))
    assert cls().replace(normalization=((0.1, 0.2), (1, 2))).normalization == ((0.1, 0.2), (1.0, 2.0))
    with pytest.raises(ConfigError, match="not a \\(mean, std\\) pair with positive stds"):
        cls(normalization=((0.5,), (0.0,)))
    with pytest.raises(ConfigError, match="not a \\(mean, std\\) pair"):
        cls().replace(normalization=(0.5, 0.2))


def test_configs_still_check_their_own_fields():
    """A config's own __post_init__ runs before the mixin's: a bad own field is reported even when the
    normalization is fine."""
    with pytest.raises(ConfigError, match="unknown attack 'cw'"):
        AttackConfig("cw", normalization=((0.5,), (0.2,)))
    with pytest.raises(ConfigError, match="no eps given"):
        EvalConfig(eps=(), normalization=((0.5,), (0.2,)))


def test_make_attack_takes_an_attack_config():
    import torch

    from aq_brevitas.attacks import make_attack

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    atk = make_attack(AttackConfig("pgd", eps=0.2, steps=3, alpha=0.05, random_start=False), model)
    assert (atk.eps, atk.steps, atk.alpha, atk.random_start) == (0.2, 3, 0.05, False)
    assert make_attack(AttackConfig("square", eps=0.1, queries=7), model).n_queries == 7
    with pytest.raises(ConfigError, match="make_attack takes an AttackConfig, got 'pgd'") as err:
        make_attack("pgd", model)  # the name alone: the one-line error names the new form
    assert "AttackConfig(name, eps=" in str(err.value)


def test_attack_accuracy_takes_an_attack_config_or_a_built_attack():
    import torch

    from aq_brevitas.attacks import make_attack
    from aq_brevitas.evaluate.accuracy import attack_accuracy

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.rand(6, 1, 2, 2)
    y = model(x).argmax(1)
    cfg = AttackConfig("fgsm", eps=0.0)
    assert (
        attack_accuracy(model, x, y, cfg)
        == attack_accuracy(model, x, y, attack=make_attack(cfg, model))
        == 1.0
    )
    with pytest.raises(ConfigError, match="config is a str, not an AttackConfig"):
        attack_accuracy(model, x, y, "pgd")  # the old name-and-keywords form
    with pytest.raises(ConfigError, match="both config and a built attack"):
        attack_accuracy(model, x, y, cfg, attack=make_attack(cfg, model))


def test_every_attack_name_has_a_builder():
    from aq_brevitas.attacks import ATTACK_BUILDERS
    from aq_brevitas.config import ATTACKS

    assert set(ATTACK_BUILDERS) == set(ATTACKS)


def _config_entry_points():
    """Every public function of the package with a ``config`` parameter annotated with a config class."""
    import importlib
    import inspect
    import pkgutil

    import aq_brevitas

    found = {}
    for info in pkgutil.walk_packages(aq_brevitas.__path__, "aq_brevitas."):
        if ".cli" in info.name or ".pipeline" in info.name:  # the CLI/run build configs themselves
            continue
        module = importlib.import_module(info.name)
        for name, fn in vars(module).items():
            if name.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != info.name:
                continue
            param = inspect.signature(fn).parameters.get("config")
            others = set(inspect.signature(fn).parameters) - {"config"}
            if param is not None and "Config" in str(param.annotation) and others:
                found[f"{info.name}.{name}"] = fn
    return found


def test_every_config_entry_point_names_the_config_for_a_loose_setting():
    # A setting passed as a keyword (the form of earlier drafts) must say where it goes, in one line,
    # before any work: each entry point that takes config= is decorated with takes_config.
    entries = _config_entry_points()
    assert len(entries) >= 11, sorted(entries)
    undecorated = sorted(n for n, fn in entries.items() if not hasattr(fn, "__wrapped__"))
    assert not undecorated, f"config entry points without @takes_config: {undecorated}"


@pytest.mark.parametrize(
    ("entry", "loose", "fix"),
    [
        ("aq_brevitas.search.core.search_policy", {"eps": 0.1}, "config=SearchConfig(eps=...)"),
        (
            "aq_brevitas.search.core.search_policy",
            {"n_samples": 3},
            "config=SearchConfig().replace(n_samples=...)",
        ),
        ("aq_brevitas.search.scorers.score", {"steps": 3}, "config=SearchConfig().replace(steps=...)"),
        (
            "aq_brevitas.evaluate.robustness.evaluate_robustness",
            {"pgd_steps": 3},
            "config=EvalConfig(pgd_steps=...)",
        ),
        (
            "aq_brevitas.train.training.adversarial_train",
            {"epochs": 1, "lr": 0.1},
            "config=TrainConfig(epochs=..., lr=...)",
        ),
        ("aq_brevitas.evaluate.accuracy.attack_accuracy", {"eps": 0.1}, "config=AttackConfig(eps=...)"),
    ],
)
def test_a_loose_setting_is_a_one_line_error_naming_the_config(entry, loose, fix):
    import importlib

    module, _, name = entry.rpartition(".")
    fn = getattr(importlib.import_module(module), name)
    with pytest.raises(ConfigError) as err:
        fn(None, None, None, **loose)  # refused before the arguments are looked at
    assert fix in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such_setting'"):
        fn(None, None, None, no_such_setting=1)


def test_a_warning_points_at_the_callers_line():
    """A warning raised deep inside an entry point (here through takes_config's wrapper and the
    conversion helpers) is attributed to the line that called the entry point."""
    import inspect
    import warnings

    from torch import nn

    from aq_brevitas import LayerSpec, LayerwisePolicy, quantize

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        quantize(model, LayerwisePolicy({"0": LayerSpec(4)}))  # layer "3" has no spec: it warns
    ours = [w for w in caught if "no spec and no default" in str(w.message)]
    assert len(ours) == 1 and (ours[0].filename, ours[0].lineno) == (__file__, line)


def test_a_near_miss_keyword_names_the_setting_it_resembles():
    import torch

    from aq_brevitas.evaluate.accuracy import attack_accuracy

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.rand(4, 1, 2, 2), torch.zeros(4, dtype=torch.long)
    with pytest.raises(
        ConfigError, match=r"no keyword 'n_queries' -- fix: pass queries=\.\.\. in config=AttackConfig"
    ):
        attack_accuracy(model, x, y, AttackConfig("square"), n_queries=50)  # torchattacks' spelling
    with pytest.raises(TypeError, match="zzz"):  # nothing like it: Python's own error
        attack_accuracy(model, x, y, AttackConfig("square"), zzz=1)
