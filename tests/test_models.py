import pytest
import torch

from aq_brevitas.errors import ModelError
from aq_brevitas.models import ARCHITECTURES, build_model


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_forward_shape_and_backward(arch):
    torch.manual_seed(0)
    model = build_model(arch)
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    out = model(x)
    assert out.shape == (4, 10)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_reference_models_are_not_plain_sequentials():
    for arch in ARCHITECTURES:
        assert not isinstance(build_model(arch), torch.nn.Sequential)


def test_resnet_has_residual_add_and_batchnorm():
    model = build_model("small_resnet")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    graph = torch.fx.symbolic_trace(model).graph
    assert any(n.op == "call_function" and "add" in str(n.target) for n in graph.nodes)


def test_unknown_architecture():
    with pytest.raises(ModelError, match="unknown architecture 'resnet50'"):
        build_model("resnet50")
