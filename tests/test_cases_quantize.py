"""Issue 14 on the quantize step (convert, injectors, ao): transposed convs, existing Brevitas models fed
QuantTensors, tied weights, and train/eval mode. Each test is a right value on a small model of its own."""

import copy
import warnings

import brevitas.nn as qnn
import pytest
import torch
from brevitas.quant import Int8ActPerTensorFixedPoint, Int8WeightPerTensorFixedPoint, Int32Bias
from torch import nn

from aq_brevitas.ao import (
    FX_DEPRECATION_MESSAGE,
    check_transposed_bn,
    convert_pt2e_model,
    prepare_fx_model,
    prepare_pt2e_model,
    to_qconfig_mapping,
    transposed_kernel_error,
    weight_channel_axis,
)
from aq_brevitas.errors import ModelError, PolicyError
from aq_brevitas.nnutils import quantizable_layers
from aq_brevitas.policy import SCALINGS, LayerSpec, LayerwisePolicy
from aq_brevitas.quantization.calibrate import calibrate
from aq_brevitas.quantization.convert import (
    GroupedQuantConvTranspose2d,
    apply_policy,
    brevitas_layer,
    quantize,
    shared_weight_layers,
)
from aq_brevitas.quantization.placement import input_quantizer
from aq_brevitas.quantization.readback import input_signedness, layer_changes
from aq_brevitas.search.candidates import candidate_table, quantized_weight

pytestmark = pytest.mark.filterwarnings(f"ignore:{FX_DEPRECATION_MESSAGE}:DeprecationWarning")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and " -- fix: " in msg
    return msg


def _warnings(fn):
    """``fn()``'s result and the messages of the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught]


# --------------------------------------------------------------------------- (a) transposed convs
class UpNet(nn.Module):
    """conv -> transposed conv (channels doubled, ``groups``) -> linear, on 1 x 6 x 6 inputs."""

    def __init__(self, groups: int = 1, bn: bool = False) -> None:
        super().__init__()
        self.enc = nn.Conv2d(1, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 8, 2, stride=2, groups=groups)
        self.bn = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.fc = nn.Linear(8 * 12 * 12, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.up(torch.relu(self.enc(x))))).flatten(1))


def _spread(layer: nn.Module) -> None:
    """Very different ranges per output channel (weight axis 1), so per-input-channel scaling shows."""
    with torch.no_grad():
        layer.weight.mul_(
            torch.linspace(0.05, 3.0, layer.weight.shape[1]).view(1, -1, *[1] * (layer.weight.dim() - 2))
        )


def _per_output_channel(w: torch.Tensor, groups: int) -> torch.Tensor:
    """A transposed conv weight (in, out/g, *k) as rows (out, in/g * K), one per output channel."""
    cin, cout_g = w.shape[0], w.shape[1]
    return w.reshape(groups, cin // groups, cout_g, -1).transpose(1, 2).reshape(groups * cout_g, -1)


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("kind", [nn.ConvTranspose1d, nn.ConvTranspose2d])
def test_grouped_transposed_per_channel_scales_are_those_of_its_output_channels(kind, scaling):
    torch.manual_seed(0)
    layer = kind(4, 6, 3, stride=2, groups=2)
    _spread(layer)
    spec = LayerSpec(4, scaling, "per_channel", act_bit_width=8)
    q = brevitas_layer(layer, spec, signed_input=False)
    qw = q.quant_weight()
    scale = qw.scale.detach().expand_as(qw.value)
    per_channel = _per_output_channel(scale, 2)
    # one scale per output channel: constant over each channel's weights
    assert torch.equal(per_channel, per_channel[:, :1].expand_as(per_channel))
    # ... equal to what Brevitas gives the same weights laid out as the rows of a per-channel Linear
    rows = _per_output_channel(layer.weight.detach(), 2)
    ref = brevitas_layer(
        nn.Linear(rows.shape[1], rows.shape[0], bias=False), LayerSpec(4, scaling, "per_channel")
    )
    with torch.no_grad():
        ref.weight.copy_(rows)
    assert torch.allclose(per_channel[:, 0], ref.quant_weight().scale.detach().flatten(), rtol=1e-5)
    codes = _per_output_channel((qw.value / qw.scale).detach().round(), 2)
    assert codes.abs().max() <= 7 and (codes != 0).any(dim=1).all()  # no output channel all zero
    x = torch.rand(2, 4, *([5] * (layer.weight.dim() - 2)))
    assert q(x).shape == layer(x).shape  # the first forward runs (it raised a raw RuntimeError)


def test_quantize_and_search_table_take_a_grouped_transposed_conv():
    torch.manual_seed(0)
    model = UpNet(groups=2).eval()
    _spread(model.up)
    x = torch.rand(4, 1, 6, 6)
    q = quantize(model, LayerwisePolicy(default=LayerSpec(4, act_bit_width=8)), calibration_data=x)
    assert isinstance(q.up, GroupedQuantConvTranspose2d) and isinstance(q.up, qnn.QuantConvTranspose2d)
    assert q(x).shape == (4, 3)
    assert {c.name: c.new for c in layer_changes(model, q)}[
        "up"
    ] == "GroupedQuantConvTranspose2d 4b max pc a8"
    ref = _per_output_channel(model.up.weight.detach(), 2).abs().amax(1) / 7
    assert torch.allclose(_per_output_channel(q.up.quant_weight().scale.detach(), 2)[:, 0], ref)
    table = candidate_table(model, x, [LayerSpec(4), LayerSpec(4, granularity="per_tensor")])
    assert torch.equal(table.weights[("up", LayerSpec(4))], q.up.quant_weight().value.detach())


def test_transposed_per_channel_scales_sit_on_weight_axis_1():
    torch.manual_seed(0)
    model = UpNet(groups=1).eval()
    _spread(model.up)
    q = quantize(model, LayerwisePolicy(default=LayerSpec(4)))
    scale = q.up.quant_weight().scale.detach()
    assert scale.shape == (1, 8, 1, 1)
    assert torch.allclose(scale.flatten(), model.up.weight.detach().abs().amax(dim=(0, 2, 3)) / 7)


def test_apply_policy_switches_a_brevitas_grouped_transposed_conv_or_refuses_in_one_line():
    torch.manual_seed(0)
    up = qnn.QuantConvTranspose2d(4, 8, 2, stride=2, groups=2, weight_quant=Int8WeightPerTensorFixedPoint)
    model = nn.Sequential(qnn.QuantIdentity(return_quant_tensor=True), up)
    x = torch.rand(2, 4, 3, 3)
    pc = apply_policy(model, LayerwisePolicy(default=LayerSpec(3, act_bit_width=6)), calibration_data=x)
    assert type(pc[1]) is GroupedQuantConvTranspose2d and pc(x).shape == (2, 8, 6, 6)
    assert type(model[1]) is qnn.QuantConvTranspose2d  # the original is left alone
    back = apply_policy(pc, LayerwisePolicy(default=LayerSpec(3, granularity="per_tensor")))
    assert type(back[1]) is qnn.QuantConvTranspose2d and back(x).shape == (2, 8, 6, 6)
    with_int_bias = nn.Sequential(
        qnn.QuantIdentity(return_quant_tensor=True),
        qnn.QuantConvTranspose2d(4, 8, 2, groups=2, bias=True, bias_quant=Int32Bias),
    )
    with pytest.raises(PolicyError) as exc:
        apply_policy(with_int_bias, LayerwisePolicy(default=LayerSpec(3)))
    assert "layer 1 (QuantConvTranspose2d, groups=2) cannot take per-channel weights" in _one_line(exc)
    assert apply_policy(with_int_bias, LayerwisePolicy(default=LayerSpec(3, granularity="per_tensor")))(
        x
    ).shape


def test_weight_channel_axis_per_backend():
    assert weight_channel_axis(False, pt2e=True) == weight_channel_axis(False, 4, pt2e=False) == 0
    assert weight_channel_axis(True, 1, pt2e=True) == 1
    assert weight_channel_axis(True, 2, pt2e=True) is None  # output channels span two axes
    assert weight_channel_axis(True, 1, pt2e=False) is None  # FX has no per-channel ConvTranspose


def _pt2e_weight(converted, op: str = "conv_transpose"):
    """(integer weight, scales, axis or None) of the dequantize feeding the first ``op`` node."""
    node = next(n for n in converted.graph.nodes if n.op == "call_function" and op in str(n.target))
    dq = node.args[1]
    ints = getattr(converted, dq.args[0].target)
    if "per_channel" in str(dq.target):
        return ints, getattr(converted, dq.args[1].target), dq.args[3]
    return ints, dq.args[1], None


def test_pt2e_puts_transposed_conv_scales_on_its_output_channels():
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = UpNet(groups=1).eval()
    _spread(model.up)
    x = torch.rand(16, 1, 6, 6)
    prepared, caught = _warnings(
        lambda: prepare_pt2e_model(copy.deepcopy(model), LayerwisePolicy(default=LayerSpec(4)), x[:2])
    )
    assert not [m for m in caught if "transposed" in m]
    with torch.no_grad():
        prepared(x)
    ints, scales, axis = _pt2e_weight(convert_pt2e_model(prepared))
    assert axis == 1 and scales.numel() == 8
    assert torch.allclose(scales.float(), model.up.weight.detach().abs().amax(dim=(0, 2, 3)) / 7, rtol=1e-4)
    assert (ints != 0).flatten(2).any(dim=2).any(dim=0).all()  # no output channel all zero
    assert ints.abs().max() <= 7


def test_pt2e_grouped_transposed_conv_gets_per_tensor_weights_with_a_warning():
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = UpNet(groups=2).eval()
    x = torch.rand(8, 1, 6, 6)
    prepared, caught = _warnings(
        lambda: prepare_pt2e_model(model, LayerwisePolicy(default=LayerSpec(4)), x[:2])
    )
    assert any("they get per-tensor weights: up (groups=2)" in m for m in caught)
    with torch.no_grad():
        prepared(x)
    converted = convert_pt2e_model(prepared)
    ints, _, axis = _pt2e_weight(converted)
    assert axis is None and ints.abs().max() <= 7
    assert converted(x).shape == (8, 3)


def test_fx_transposed_conv_gets_per_tensor_weights_with_a_warning_not_an_assertion():
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    model = UpNet(groups=2).eval()
    x = torch.rand(8, 1, 6, 6)
    policy = LayerwisePolicy(default=LayerSpec(4))
    prepared, caught = _warnings(lambda: prepare_fx_model(copy.deepcopy(model), policy, x[:1]))
    assert any("per-tensor weights: up (FX has no per-channel ConvTranspose)" in m for m in caught)
    with torch.no_grad():
        prepared(x)
    w = convert_fx(prepared).up.weight()
    assert w.qscheme() in (torch.per_tensor_symmetric, torch.per_tensor_affine)
    assert w.int_repr().abs().max() <= 7
    # the bare mapping: its global default gives transposed convs per-tensor weights (no AssertionError)
    glob = prepare_fx(copy.deepcopy(model), to_qconfig_mapping(policy), (x[:1],))
    with torch.no_grad():
        glob(x)
    assert convert_fx(glob).up.weight().qscheme() in (torch.per_tensor_symmetric, torch.per_tensor_affine)
    # layers given as name -> module: the named transposed conv is recognised and warned about
    _, caught = _warnings(lambda: to_qconfig_mapping(policy, layers=quantizable_layers(model)))
    assert any("per-tensor weights: up (FX" in m for m in caught)


def test_fx_names_transposed_convs_that_qat_leaves_float():
    _, caught = _warnings(
        lambda: prepare_fx_model(
            UpNet().train(), LayerwisePolicy(default=LayerSpec(4)), torch.rand(1, 1, 6, 6), qat=True
        )
    )
    assert any(
        m.startswith("torch.ao FX has no QAT ConvTranspose: up compute with float weights") for m in caught
    )


def test_fx_transposed_kernel_probe_matches_the_engine():
    """The probe's verdict is what convert_fx's ConvTranspose gives on the current engine."""
    from torch.ao.quantization.quantize_fx import convert_fx

    torch.manual_seed(0)
    model = UpNet().eval()
    x = torch.rand(32, 1, 6, 6)
    policy = LayerwisePolicy(default=LayerSpec(8, granularity="per_tensor"))
    prepared, caught = _warnings(lambda: prepare_fx_model(copy.deepcopy(model), policy, x[:1]))
    with torch.no_grad():
        prepared(x)
        err = (convert_fx(prepared)(x) - model(x)).abs().max().item()
    scale = model(x).abs().max().item()
    broken = transposed_kernel_error(torch.backends.quantized.engine) > 0.02
    assert any("quantized ConvTranspose kernel is wrong" in m for m in caught) == broken
    assert (
        err > 0.2 * scale
    ) == broken  # 8-bit weights and activations: within 20% unless the kernel is wrong


@pytest.mark.parametrize(
    "groups,qat,fx", [(2, False, True), (2, False, False), (2, True, False), (1, True, True)]
)
def test_transposed_conv_bn_torch_cannot_fuse_is_refused_in_one_line(groups, qat, fx):
    model = UpNet(groups=groups, bn=True).eval()
    with pytest.raises(ModelError) as exc:
        check_transposed_bn(model, fx=fx, qat=qat)
    assert "cannot fuse BatchNorm bn into transposed conv up" in _one_line(exc)
    check_transposed_bn(UpNet(groups=1, bn=True), fx=fx, qat=False)  # torch fuses that one fine


# ------------------------------------------------------------ (h) existing Brevitas models, QuantTensors
def _conv(cin: int, cout: int) -> nn.Module:
    return qnn.QuantConv2d(
        cin, cout, 3, weight_quant=Int8WeightPerTensorFixedPoint, bias=True, bias_quant=Int32Bias
    )


class BrevNet(nn.Module):
    """QuantIdentity -> nested Sequentials of (QuantConv2d with Int32Bias, QuantReLU) -> QuantLinear, all
    fixed-point, activations returned as QuantTensors (the layers are fed QuantTensors)."""

    def __init__(self) -> None:
        super().__init__()
        relu = lambda: qnn.QuantReLU(act_quant=Int8ActPerTensorFixedPoint, return_quant_tensor=True)  # noqa: E731
        self.inp = qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint, return_quant_tensor=True)
        self.features = nn.Sequential(nn.Sequential(_conv(1, 4), relu()), nn.Sequential(_conv(4, 4), relu()))
        self.head = qnn.QuantLinear(
            4 * 4 * 4, 3, weight_quant=Int8WeightPerTensorFixedPoint, bias=True, bias_quant=Int32Bias
        )

    def forward(self, x):
        return self.head(self.features(self.inp(x)).flatten(1))


def test_apply_policy_rebits_a_brevitas_model_fed_quant_tensors():
    torch.manual_seed(0)
    model = BrevNet().eval()
    x = torch.randn(8, 1, 8, 8)  # signed images: the first layer's input is signed, the others follow ReLUs
    before = model(x)
    policy = LayerwisePolicy(
        {
            "features.0.0": LayerSpec(4, "po2", "per_tensor", act_bit_width=6),
            "features.1.0": LayerSpec(3, "po2", "per_channel", act_bit_width=5),
            "head": LayerSpec(2, "po2", "per_tensor", act_bit_width=4),
        }
    )
    q = apply_policy(model, policy, calibration_data=x)
    assert q(x).shape == (8, 3)
    for name, spec in policy.layers.items():
        layer = q.get_submodule(name)
        assert int(layer.quant_weight().bit_width) == spec.weight_bit_width
        assert int(input_quantizer(q, name).bit_width()) == spec.act_bit_width
        assert layer.weight is not model.get_submodule(name).weight
        assert torch.equal(layer.weight, model.get_submodule(name).weight)  # float weights kept
    # what the quantizers are: the model's own QuantReLUs are re-bitted, keeping their signed Int8 quantizers
    # (calibration saw non-negative inputs there, but no quantizer was replaced to make them unsigned)
    assert input_signedness(q) == {"features.0.0": True, "features.1.0": True, "head": True}
    assert torch.equal(model(x), before)  # the user's model is untouched


def test_apply_policy_without_act_bits_keeps_the_models_own_activation_quantizers():
    torch.manual_seed(0)
    model = BrevNet().eval()
    x = torch.rand(4, 1, 8, 8)
    q = apply_policy(model, LayerwisePolicy(default=LayerSpec(4, "po2", "per_tensor")), calibration_data=x)
    assert {int(m.quant_weight().bit_width) for m in quantizable_layers(q).values()} == {4}
    assert q(x).shape == (4, 3)


# --------------------------------------------------------------------------------- (k) tied weights
class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.c = nn.Linear(6, 2)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_a_tied_weight_stays_tied_and_each_layer_quantizes_it_with_its_spec():
    torch.manual_seed(0)
    model = Tied()
    assert shared_weight_layers(model) == [["a", "b"]]
    policy = LayerwisePolicy({"a": LayerSpec(3), "b": LayerSpec(8), "c": LayerSpec(8)})
    q, caught = _warnings(lambda: quantize(model, policy))
    assert (
        "layers a (3b max pc), b (8b max pc) share one weight Parameter but the policy quantizes it differently"
        in "\n".join(caught)
    )
    assert q.a.weight is q.b.weight and q.a.weight is not model.a.weight
    assert int(q.a.quant_weight().bit_width) == 3 and int(q.b.quant_weight().bit_width) == 8
    assert torch.equal(q.a.quant_weight().value, quantized_weight(model.a, LayerSpec(3)))
    assert torch.equal(q.b.quant_weight().value, quantized_weight(model.b, LayerSpec(8)))
    q.a.weight.data.add_(1.0)  # a tie is one tensor: fine-tuning keeps it
    assert torch.equal(q.b.weight, q.a.weight)


def test_a_tied_weight_with_one_weight_spec_is_not_warned_about():
    same = LayerwisePolicy({"a": LayerSpec(4), "b": LayerSpec(4, act_bit_width=8), "c": LayerSpec(4)})
    q, caught = _warnings(lambda: quantize(Tied(), same))
    assert not [m for m in caught if "share one weight Parameter" in m]
    assert q.a.weight is q.b.weight
    _, caught = _warnings(
        lambda: apply_policy(q, LayerwisePolicy({"a": LayerSpec(2), "b": LayerSpec(5), "c": LayerSpec(4)}))
    )
    assert any("layers a (2b max pc), b (5b max pc) share one weight Parameter" in m for m in caught)


def test_a_tied_weight_left_float_in_one_layer_is_named():
    _, caught = _warnings(lambda: quantize(Tied(), LayerwisePolicy({"a": LayerSpec(4), "c": LayerSpec(4)})))
    assert any("layers a (4b max pc), b (float) share one weight Parameter" in m for m in caught)


# ----------------------------------------------------------------------------- (d) train/eval mode
class WithBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


def _flags(model: nn.Module, names=("", "conv", "bn", "drop", "fc")) -> dict[str, bool]:
    return {n: model.get_submodule(n).training for n in names}


def _bn_state(model: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for t in (model.bn.running_mean, model.bn.running_var, model.bn.num_batches_tracked)]


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_quantize_and_apply_policy_give_models_back_in_their_mode_with_bn_statistics_untouched(mode):
    torch.manual_seed(0)
    model = WithBN().train(mode != "eval")
    if mode == "mixed":
        model.bn.eval()
    flags, stats = _flags(model), _bn_state(model)
    x = torch.rand(8, 1, 6, 6)
    q = quantize(model, LayerwisePolicy(default=LayerSpec(4, act_bit_width=8)), calibration_data=x)
    assert _flags(model) == flags == _flags(q)
    assert all(torch.equal(a, b) for a, b in zip(_bn_state(model), stats))
    assert all(torch.equal(a, b) for a, b in zip(_bn_state(q), stats))
    r = apply_policy(q, LayerwisePolicy(default=LayerSpec(3, act_bit_width=6)), calibration_data=x)
    assert _flags(r) == flags
    assert all(torch.equal(a, b) for a, b in zip(_bn_state(r), stats))
    calibrate(q, x, bias_correction=True)
    assert _flags(q) == flags


@pytest.mark.parametrize("qat", [False, True])
def test_prepare_pt2e_model_gives_the_model_back_in_its_mode(qat):
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = WithBN().train(not qat)  # the opposite of the mode export needs
    model.drop.train(qat)
    flags, stats = _flags(model), _bn_state(model)
    prepare_pt2e_model(model, LayerwisePolicy(default=LayerSpec(4)), torch.rand(2, 1, 6, 6), qat=qat)
    assert _flags(model) == flags
    assert all(torch.equal(a, b) for a, b in zip(_bn_state(model), stats))
