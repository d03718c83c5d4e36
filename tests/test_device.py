"""The ``device`` option (issue 23, item 5): attacks run where the config says, a GPU when one is
present under "auto"; the model comes back to where it was; a device this machine lacks is refused in
one line. Tests and CI run on CPU, so the GPU branch is checked only where CUDA exists."""

import pytest
import torch
from torch import nn

from aq_brevitas import EvalConfig, evaluate_robustness
from aq_brevitas.errors import ConfigError
from aq_brevitas.search import SearchConfig
from aq_brevitas.workers import on_device, resolve_device
from conftest import run_cli

torch.set_num_threads(1)


def test_auto_is_a_gpu_when_present_and_a_missing_gpu_is_refused():
    cpu_model = nn.Linear(2, 2)
    if torch.cuda.is_available():
        assert resolve_device("auto", cpu_model).type == "cuda"
        assert resolve_device("cuda").type == "cuda"
    else:
        assert resolve_device("auto", cpu_model) == torch.device("cpu")
        with pytest.raises(ConfigError, match="not available on this machine"):
            resolve_device("cuda")
    assert resolve_device(None, cpu_model) == torch.device("cpu")
    with pytest.raises(ConfigError, match="cannot run attacks"):
        resolve_device("meta")


@pytest.mark.parametrize("make", [EvalConfig, SearchConfig])
def test_configs_refuse_an_unknown_device_at_construction(make):
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        make(device="tpu")
    assert make(device="cuda:1").device == "cuda:1"  # existence is checked where the attacks run


def test_on_device_gives_the_model_back_where_it_was():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    weight = model[0].weight
    with on_device([model, None], "cpu") as where:
        assert where == torch.device("cpu") and model[0].weight.device == where
    assert model[0].weight is weight and weight.device == torch.device("cpu")


def test_an_evaluation_on_the_cpu_device_gives_the_default_report(fmnist_val_512):
    from aq_brevitas.models import load_float_model

    model = load_float_model("cnn-pgd")[0]
    x, y = fmnist_val_512[0][:16], fmnist_val_512[1][:16]
    cfg = EvalConfig(eps=(0.1,), suite=("apgd-ce",), suite_steps=3, gradient_free=False, large_eps_images=8)
    auto = evaluate_robustness(model, (x, y), cfg, progress=False)
    cpu = evaluate_robustness(model, (x, y), cfg.replace(device="cpu"), progress=False)
    assert auto.robust_accuracy(0.1) == cpu.robust_accuracy(0.1) or torch.cuda.is_available()


def test_cli_refuses_a_missing_gpu_in_one_line():
    res = run_cli("evaluate", "--model", "cnn-pgd", "--images", "4", "--device", "cuda:99")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "device 'cuda:99' is not available on this machine" in res.stderr
