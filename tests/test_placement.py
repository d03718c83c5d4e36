"""Activation quantizers at the producers of the layers' inputs (aq_brevitas.quantization.placement), as FINN needs."""

import warnings

import brevitas.nn as qnn
import onnx
import pytest
import torch
from torch import fx, nn
from torch.nn import functional as F

from aq_brevitas.errors import PolicyError
from aq_brevitas.export import export_qonnx
from aq_brevitas.models import build_model, load_float_model
from aq_brevitas.policy import LayerSpec, LayerwisePolicy
from aq_brevitas.quantization.checkpoint import load_quantized, save_quantized
from aq_brevitas.quantization.convert import apply_policy, quantize
from aq_brevitas.quantization.placement import input_quantizer
from aq_brevitas.quantization.readback import layer_changes

torch.set_num_threads(1)
W4A4 = LayerwisePolicy(default=LayerSpec(4, "max", "per_channel", act_bit_width=4))


def _relu_then_quant(path) -> tuple[int, list[str]]:
    """How many Relu nodes the file has, and those whose output feeds anything but a Quant node."""
    graph = onnx.load(str(path)).graph
    readers = {}
    for n in graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n.op_type)
    relus = [n for n in graph.node if n.op_type == "Relu"]
    return len(relus), [n.name for n in relus if set(readers.get(n.output[0], [])) != {"Quant"}]


@pytest.mark.parametrize("fold_bn", [False, True])
def test_zoo_nets_get_quantrelu_after_every_relu_and_export_with_relu_then_quant(
    tmp_path, fold_bn, fmnist_val_512
):
    x = fmnist_val_512[0][:128]
    for name in ("cnn-pgd", "vgg-pgd"):
        model, _ = load_float_model(name)
        q = quantize(model, W4A4, calibration_data=x, fold_bn=fold_bn).eval()
        assert isinstance(q, fx.GraphModule) and type(q).__name__ == type(model).__name__
        acts = [m for m in q.modules() if isinstance(m, qnn.QuantReLU)]
        assert len(acts) == sum(1 for c in layer_changes(model, q) if "QuantReLU" in c.new) >= 3
        assert all(int(a.act_quant.bit_width()) == 4 and not a.act_quant.is_signed for a in acts)
        with torch.no_grad():
            f, g = model(x), q(x)
        assert (g.argmax(1) == f.argmax(1)).float().mean() > 0.85
        res = export_qonnx(q, tmp_path / f"{name}.onnx", x[:1], images=x[1:5])
        n_relu, not_followed = _relu_then_quant(res.path)
        assert n_relu >= 3 and not_followed == []
        assert res.act_bits == {n: 4 for n in res.layer_bits}  # read back through MaxPool/Flatten


def test_input_placement_keeps_the_old_layout_where_relu_and_maxpool_stay_float(tmp_path, fmnist_val_512):
    x = fmnist_val_512[0][:64]
    q = quantize(load_float_model("cnn-pgd")[0], W4A4, calibration_data=x, act_placement="input").eval()
    assert not isinstance(q, fx.GraphModule) and not any(isinstance(m, qnn.QuantReLU) for m in q.modules())
    assert int(q.conv2.input_quant.bit_width()) == 4
    res = export_qonnx(q, tmp_path / "old.onnx", x[:1])
    assert _relu_then_quant(res.path)[1] != []  # Relu -> MaxPool -> Quant: what FINN cannot partition


def test_a_sequential_with_relu_modules_is_changed_in_place_and_keeps_its_class():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 10))
    q = quantize(net, W4A4, calibration_data=torch.rand(16, 1, 8, 8))
    assert type(q) is nn.Sequential and isinstance(q[1], qnn.QuantReLU) and isinstance(net[1], nn.ReLU)
    assert int(input_quantizer(q, "4").bit_width()) == 4 and input_quantizer(q, "0") is q[0].input_quant
    assert q(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_a_relu_module_called_twice_gets_one_quantizer_per_call():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.c(self.relu(self.b(self.relu(self.a(x)))))

    policy = LayerwisePolicy(
        {"a": LayerSpec(4), "b": LayerSpec(4, act_bit_width=3), "c": LayerSpec(4, act_bit_width=5)}
    )
    q = quantize(Twice(), policy, calibration_data=torch.randn(32, 6))
    assert isinstance(q, fx.GraphModule)
    assert sorted(int(m.act_quant.bit_width()) for m in q.modules() if isinstance(m, qnn.QuantReLU)) == [3, 5]
    assert int(input_quantizer(q, "b").bit_width()) == 3 and int(input_quantizer(q, "c").bit_width()) == 5


def test_residual_net_quantizes_after_adds_and_exports_at_parity(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28)
    q = quantize(build_model("small_resnet").eval(), W4A4, calibration_data=x).eval()
    assert q(x).shape == (8, 10)
    res = export_qonnx(q, tmp_path / "r.onnx", x[:1], images=x[1:3])
    assert res.diff_without_flips <= res.allowed_diff and res.act_bits == {n: 4 for n in res.layer_bits}


def test_layers_reading_one_tensor_get_one_quantizer_each_at_the_widest_bits_with_a_warning():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 3), nn.Linear(6, 3)

        def forward(self, x):
            h = F.relu(self.a(x))
            return self.b(h) + self.c(h)

    policy = LayerwisePolicy({"b": LayerSpec(4, act_bit_width=3), "c": LayerSpec(4, act_bit_width=6)})
    with pytest.warns(UserWarning, match=r"layers b, c read one activation .* quantized once, at 6 bits"):
        q = quantize(Fork(), policy, calibration_data=torch.randn(16, 6))
    # generic: one quantizer at the producer, read by both
    qb, qc = input_quantizer(q, "b"), input_quantizer(q, "c")
    assert qb is qc and int(qb.bit_width()) == 6
    finn = LayerwisePolicy(default=LayerSpec(4, act_bit_width=6))
    q = quantize(Fork(), finn, calibration_data=torch.randn(16, 6), target="finn")
    # FINN's layout: one quantizer per reader (its streamlining moves a scale only where it has one consumer)
    qb, qc = input_quantizer(q, "b"), input_quantizer(q, "c")
    assert qb is not qc and int(qb.bit_width()) == int(qc.bit_width()) == 6
    assert (
        not qb.is_signed and not qc.is_signed
    )  # the copy on the ReLU's input is unsigned: it clamps as the ReLU


def test_an_untraceable_model_keeps_input_quantizers_and_says_it_is_not_finn_ready():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = F.relu(self.a(x))
            if h.sum() > 0:  # data-dependent control flow: fx cannot trace it
                h = h * 2
            return self.b(h)

    with pytest.warns(UserWarning, match="not FINN-ready.*cannot trace"):
        q = quantize(Branchy(), LayerwisePolicy(default=LayerSpec(4, act_bit_width=4)))
    assert int(q.b.input_quant.bit_width()) == 4


def test_producer_placed_model_round_trips_through_a_checkpoint(tmp_path, fmnist_val_512):
    x = fmnist_val_512[0][:64]
    model, _ = load_float_model("cnn-pgd")
    q = quantize(model, W4A4, calibration_data=x).eval()
    save_quantized(q, tmp_path / "q.pt", meta={"arch": "small_cnn"})
    back, meta = load_quantized(tmp_path / "q.pt")
    assert (
        set(meta["act_placement"].values()) <= {"producer", "input"}
        and "producer" in meta["act_placement"].values()
    )
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


def test_apply_policy_rebits_the_models_own_activation_layers():
    class UserNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = qnn.QuantIdentity(bit_width=8, return_quant_tensor=False)
            self.conv = qnn.QuantConv2d(1, 4, 3, weight_bit_width=8)
            self.act = qnn.QuantReLU(bit_width=8)
            self.fc = qnn.QuantLinear(4 * 3 * 3, 10, bias=True, weight_bit_width=8)

        def forward(self, x):
            return self.fc(F.max_pool2d(self.act(self.conv(self.inp(x))), 2).flatten(1))

    policy = LayerwisePolicy({"conv": LayerSpec(4, act_bit_width=5), "fc": LayerSpec(4, act_bit_width=3)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: both quantizers exist already
        q = apply_policy(UserNet(), policy, calibration_data=torch.rand(8, 1, 8, 8))
    assert type(q).__name__ == "UserNet" and not isinstance(q, fx.GraphModule)
    assert int(q.inp.act_quant.bit_width()) == 5 and int(q.act.act_quant.bit_width()) == 3
    assert q(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_an_unknown_placement_is_a_one_line_policy_error():
    with pytest.raises(PolicyError, match="act_placement='after' is not one of producer, input"):
        quantize(build_model("small_cnn"), W4A4, act_placement="after")


def test_target_finn_refuses_what_finn_cannot_build_in_one_line():
    from aq_brevitas.policy import for_target
    from aq_brevitas.search import SearchConfig

    model = build_model("small_cnn")
    cases = [
        (LayerwisePolicy(default=LayerSpec(4)), {}, "layers conv1, conv2, fc1, fc2 have no act_bit_width"),
        (LayerwisePolicy(default=LayerSpec(4, act_bit_width=12)), {}, "inputs over 8 bits"),
        (W4A4, {"act_placement": "input"}, "needs act_placement='producer'"),
        (W4A4, {"target": "fpga"}, "target 'fpga' is not one of generic, finn"),
    ]
    for policy, kw, message in cases:
        with pytest.raises(PolicyError, match=message):
            quantize(model, policy, **{"target": "finn", **kw})
    assert isinstance(quantize(model, W4A4, target="finn"), fx.GraphModule)
    finn = SearchConfig(target="finn")
    assert {c.act_bit_width for c in finn.candidates} == {2, 3, 4, 8}  # the widths are searched
    per_layer = SearchConfig(target="finn", candidates={"fc2": [LayerSpec(2, act_bit_width=4)]}).candidates
    assert per_layer["fc2"] == (LayerSpec(2, act_bit_width=4),) and all(
        c.act_bit_width == 8 for c in per_layer["*"]
    )
    with pytest.raises(PolicyError, match="asks for 16-bit inputs"):
        for_target([LayerSpec(4, act_bit_width=16)], "finn")
