"""The attack twin: the Brevitas model's numbers (logits, codes, input gradients) from a faster forward.

Tolerances: none. The twin runs Brevitas's own arithmetic op for op (the same division, round,
clamp and multiply; the same conv on the same constant weights), so logits, integer codes and input
gradients are compared bit for bit, and the twin's own count of flipped codes must be 0. Where a test
makes the twin differ on purpose, the count must see it.
"""

import brevitas.nn as qnn
import pytest
import torch
from brevitas.inject.enum import ScalingImplType
from brevitas.quant import Int8ActPerTensorFloat
from torch import nn
from torch.nn import functional as F

from aq_brevitas import LayerSpec, LayerwisePolicy, quantize
from aq_brevitas.forward import frozen_quant_weights
from aq_brevitas.quantization.injectors import act_quant_for
from aq_brevitas.quantization.twin import (
    active_twin,
    attack_twin,
    brevitas_forward,
    fusable_quantizer,
    verified_logits,
)


class TinyBN(nn.Module):
    """conv-BN-ReLU-pool twice and a two-layer head: the shape of the zoo's VGG, at toy size."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8 * 2 * 2, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.max_pool2d(F.relu(self.b2(self.c2(x))), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(36, 12),
        nn.ReLU(),
        nn.Linear(12, 10),
    )


def _model(arch: str, spec: LayerSpec, placement: str = "producer") -> nn.Module:
    torch.manual_seed(0)
    net = TinyBN() if arch == "bn" else _tiny_cnn()
    if arch == "bn":  # non-trivial running statistics
        net.train()
        with torch.no_grad():
            net(torch.rand(64, 1, 8, 8))
    calib = torch.rand(32, 1, 8, 8)
    return quantize(
        net.eval(), LayerwisePolicy(default=spec), calibration_data=calib, act_placement=placement
    ).eval()


def _logits_and_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (g,) = torch.autograd.grad(F.cross_entropy(out, y), x)
    return out.detach(), g


SPECS = {
    "w4a4": LayerSpec(4, act_bit_width=4),
    "w4a8": LayerSpec(4, act_bit_width=8),
    "w2a2": LayerSpec(2, act_bit_width=2),
    "w2": LayerSpec(2),
    "w4a4-per-tensor": LayerSpec(4, "max", "per_tensor", act_bit_width=4),
    "w3a5-po2": LayerSpec(3, "po2", "per_channel", act_bit_width=5),
}


@pytest.mark.parametrize("arch", ["bn", "cnn"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_twin_logits_codes_and_input_gradients_are_brevitas(arch, spec):
    model = _model(arch, SPECS[spec])
    x, y = torch.rand(24, 1, 8, 8), torch.randint(0, 10, (24,))
    with frozen_quant_weights(model):
        ref_logits, ref_grad = _logits_and_grad(model, x, y)
    with attack_twin(model) as twin:
        logits, grad = _logits_and_grad(model, x, y)
        judged = verified_logits(model, x)
    assert not twin.refused
    assert len(twin.layers) == (4 if arch == "bn" else 3)
    assert len(twin.fused) == (0 if spec == "w2" else 4 if arch == "bn" else 3)
    assert torch.equal(logits, ref_logits) and torch.equal(judged, ref_logits)
    assert torch.equal(grad, ref_grad) and grad.abs().sum() > 0
    assert (twin.checked, twin.disagreements, twin.flipped, twin.max_logit_gap) == (24, 0, 0, 0.0)


def test_input_placement_fuses_each_layers_own_input_quantizer():
    model = _model("cnn", SPECS["w4a4"], placement="input")
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    with frozen_quant_weights(model):
        ref = _logits_and_grad(model, x, y)
    with attack_twin(model) as twin:
        got = _logits_and_grad(model, x, y)
    assert sorted(twin.fused) == ["0.input_quant", "4.input_quant", "6.input_quant"]
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def _edge_points(q, dtype=torch.float32) -> torch.Tensor:
    """Inputs on and next to every rounding boundary and both gradient edges of quantizer ``q``."""
    s = float(q.scale)
    centres = [(k + 0.5) * s for k in range(int(q.lo) - 2, int(q.hi) + 2)] + [q.x_lo, q.x_hi, 0.0]
    pts = []
    for c in centres:
        if abs(c) == float("inf"):
            continue
        t = torch.tensor([c], dtype=dtype)
        for _ in range(3):
            t = torch.nextafter(t, torch.tensor([-1e30], dtype=dtype))
        for _ in range(7):
            pts.append(t.clone())
            t = torch.nextafter(t, torch.tensor([1e30], dtype=dtype))
    return torch.cat(pts)


@pytest.mark.parametrize(
    "layer",
    [
        qnn.QuantReLU(act_quant=act_quant_for(3, signed=False), return_quant_tensor=False),
        qnn.QuantIdentity(act_quant=act_quant_for(4, signed=True), return_quant_tensor=False),
        qnn.QuantIdentity(act_quant=act_quant_for(2, signed=False), return_quant_tensor=False),
        qnn.QuantIdentity(act_quant=act_quant_for(4, signed=True, po2=True), return_quant_tensor=False),
    ],
    ids=["relu-u3", "identity-s4", "identity-u2", "identity-s4-po2"],
)
def test_every_rounding_boundary_and_gradient_edge_matches_brevitas(layer):
    torch.manual_seed(1)
    layer.train()
    layer(torch.randn(256) * 1.7)  # calibrate a scale
    layer.eval()
    q = fusable_quantizer(layer.act_quant, "q")
    assert not isinstance(q, str)
    x = _edge_points(q)
    g = torch.randn_like(x)
    xb = x.clone().requires_grad_(True)
    ref = layer(xb)
    ref.backward(g)
    with attack_twin(layer) as twin:
        xt = x.clone().requires_grad_(True)
        out = layer(xt)
        out.backward(g)
    assert twin.fused == ["act_quant"]
    assert torch.equal(out.detach(), ref.detach())
    assert torch.equal(xt.grad, xb.grad)  # the same mask at every edge, and the same (g·s)/s values
    assert 0 < int((xb.grad == 0).sum()) < len(x)  # the edges were inside the tested points


def test_context_restores_the_model_exactly_also_after_an_exception():
    model = _model("bn", SPECS["w4a4"])
    x = torch.rand(8, 1, 8, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(x).detach()
    with pytest.raises(RuntimeError, match="boom"), attack_twin(model) as twin:
        assert active_twin(model) is twin and "forward" in model.c1.__dict__
        model(x)
        raise RuntimeError("boom")
    with attack_twin(model) as twin:
        with attack_twin(model) as inner:  # nested blocks share one twin
            assert inner is twin
        model(x).sum()
    assert active_twin(model) is None
    assert all("forward" not in m.__dict__ and "quant_weight" not in m.__dict__ for m in model.modules())
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert torch.equal(model(x).detach(), before)
    assert model.c1.weight.requires_grad  # weights train again after the block


def test_float_model_passes_through_and_brevitas_forward_is_a_noop_outside():
    net = _tiny_cnn().eval()
    x = torch.rand(4, 1, 8, 8)
    with attack_twin(net) as twin, brevitas_forward(net):
        assert (twin.fused, twin.layers, twin.refused, twin.frozen) == ([], [], {}, 0)
        assert torch.equal(verified_logits(net, x), net(x))
    assert twin.checked == 0


def test_a_twin_that_differs_is_caught_and_brevitas_judges():
    model = _model("cnn", SPECS["w4a4"])
    x = torch.rand(64, 1, 8, 8)
    with frozen_quant_weights(model), torch.no_grad():
        ref = model(x)
    with attack_twin(model) as twin:
        q = twin.quantizers["1.act_quant"]
        q.scale = q.scale * 1.2  # a twin that no longer matches: codes move across boundaries
        assert not torch.equal(model(x), ref)
        with brevitas_forward(model):
            assert torch.equal(model(x), ref)
        judged = verified_logits(model, x)
    assert torch.equal(judged, ref)
    assert twin.checked == 64 and twin.flipped > 0 and twin.max_logit_gap > 0
    assert twin.summary()["flipped_codes"] == twin.flipped


def test_refuses_what_it_cannot_fuse_and_keeps_brevitas_there():
    torch.manual_seed(0)
    dynamic = Int8ActPerTensorFloat.let(scaling_impl_type=ScalingImplType.STATS)
    model = nn.Sequential(
        qnn.QuantIdentity(act_quant=dynamic, return_quant_tensor=False),  # scale follows the input
        qnn.QuantLinear(16, 8, bias=True, weight_bit_width=4),
        qnn.QuantReLU(act_quant=act_quant_for(4, signed=False), return_quant_tensor=True),
        qnn.QuantLinear(8, 4, bias=True, weight_bit_width=4, input_quant=None),
    )
    model.train()
    model(torch.randn(64, 16))
    model.eval()
    x, y = torch.randn(12, 16), torch.randint(0, 4, (12,))
    with frozen_quant_weights(model):
        ref = _logits_and_grad(model, x, y)
    with attack_twin(model) as twin:
        got = _logits_and_grad(model, x, y)
        verified_logits(model, x)
    assert "RuntimeStatsScaling" in twin.refused["0"]
    assert "QuantTensor" in twin.refused["2"]
    assert twin.layers == ["1", "3"] and twin.fused == []
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert twin.disagreements == 0 and twin.flipped == 0

    model.train()  # a model entered in training mode keeps every quantizer's Brevitas forward
    with attack_twin(model) as twin:
        pass
    assert twin.fused == [] and all("training mode" in why for n, why in twin.refused.items() if n == "0")


def test_evaluations_attack_the_twin_and_count_what_brevitas_gets_wrong():
    from aq_brevitas import AttackConfig, EvalConfig, attack_accuracy, evaluate_robustness
    from aq_brevitas.attacks import make_attack

    model = _model("bn", SPECS["w4a4"])
    x = torch.rand(40, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    cfg = EvalConfig(
        eps=(0.05,), attacks=("clean", "pgd"), pgd_steps=3, gradient_free=False, suite="none",
        autoattack="off", indicators=False, large_eps_images=8,
    )  # fmt: skip
    report = evaluate_robustness(model, (x, y), cfg, progress=False)
    record = report.meta["attack_twin"]
    assert record["fused_quantizers"] == 4 and record["refused"] == {}
    assert record["checked"] >= 40 and record["disagreements"] == 0 and record["flipped_codes"] == 0
    assert any(n.startswith("attacks ran on the attack twin") for n in report.notes)

    # the same attack with the Brevitas forward throughout gives the same accuracy
    attack = AttackConfig("pgd", 0.1, 5)
    with frozen_quant_weights(model):
        atk = make_attack(attack, model, seed=3)
        torch.manual_seed(3)
        adv = torch.cat([atk(xb, yb) for xb, yb in zip(x.split(64), y.split(64), strict=True)])
        with torch.no_grad():
            expected = (model(adv).argmax(1) == y).sum().item() / len(y)
    assert 0 < expected < 1 and attack_accuracy(model, x, y, attack, seed=3, batch_size=64) == expected


def test_float64_models_are_bit_equal_too():
    torch.manual_seed(0)
    net = _tiny_cnn().double()
    x, y = torch.rand(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (16,))
    model = quantize(net, LayerwisePolicy(default=SPECS["w4a4"]), calibration_data=x).eval()
    with frozen_quant_weights(model):
        ref = _logits_and_grad(model, x, y)
    with attack_twin(model) as twin:
        got = _logits_and_grad(model, x, y)
    assert len(twin.fused) == 3 and not twin.refused
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
