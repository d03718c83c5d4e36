import itertools
import warnings

import brevitas.nn as qnn
import pytest
import torch
from torch import nn

from aq_brevitas.errors import PolicyError
from aq_brevitas.models import build_model, load_float_model
from aq_brevitas.policy import GRANULARITIES, SCALINGS, LayerSpec, LayerwisePolicy
from aq_brevitas.quantization.checkpoint import load_quantized, save_quantized
from aq_brevitas.quantization.convert import apply_policy, quantize
from aq_brevitas.quantization.placement import input_quantizer
from aq_brevitas.quantization.readback import layer_changes, read_policy


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.head = nn.ModuleDict({"fc": nn.Linear(4 * 5 * 5, 6)})

    def forward(self, x):
        return self.head["fc"](torch.relu(self.conv(x)).flatten(1))


def _levels(w: torch.Tensor, per_channel: bool) -> int:
    if per_channel:
        return max(len(torch.unique(w[i])) for i in range(w.shape[0]))
    return len(torch.unique(w))


@pytest.mark.parametrize(
    "bits,scaling,granularity", list(itertools.product(range(1, 9), SCALINGS, GRANULARITIES))
)
def test_every_spec_gives_its_bit_width_and_levels(bits, scaling, granularity):
    torch.manual_seed(bits)
    model = Tiny()
    spec = LayerSpec(bits, scaling, granularity)
    q = quantize(model, LayerwisePolicy(default=spec))
    for name in ("conv", "head.fc"):
        layer = q.get_submodule(name)
        assert isinstance(layer, (qnn.QuantConv2d, qnn.QuantLinear))
        qw = layer.quant_weight()
        assert int(qw.bit_width) == bits
        assert _levels(qw.value.detach(), granularity == "per_channel") <= (2 if bits == 1 else 2**bits - 1)
    assert q(torch.rand(2, 2, 5, 5)).shape == (2, 6)


@pytest.fixture(scope="module")
def real_fc1():
    """A trained layer (cnn-pgd's fc1, 128 x 6272): a real, heavy-tailed weight distribution."""
    return load_float_model("cnn-pgd")[0].fc1


def _quant_weight(layer: nn.Module, spec: LayerSpec):
    return quantize(nn.Sequential(layer), LayerwisePolicy(default=spec))[0].quant_weight()


@pytest.mark.parametrize(
    "bits,scaling,granularity", list(itertools.product(range(1, 9), SCALINGS, GRANULARITIES))
)
def test_every_spec_uses_its_grid_on_a_real_layer(real_fc1, bits, scaling, granularity):
    qw = _quant_weight(real_fc1, LayerSpec(bits, scaling, granularity))
    scale = qw.scale.detach()
    codes = torch.round(qw.value.detach() / scale)  # integer codes, per channel or per tensor
    top = int(codes.abs().max())
    if bits == 1:
        assert set(codes.unique().tolist()) == {-1.0, 1.0}
    else:
        # The grid is used, not just bounded: the top code is reached (po2 rounds the scale up, so
        # at worst it halves the top) and there are more levels than a (b-2)-bit grid could hold.
        assert top == 2 ** (bits - 1) - 1 if scaling != "po2" else 2 ** (bits - 2) <= top < 2 ** (bits - 1)
        assert len(codes.unique()) >= 2 ** (bits - 2) + 1
    if scaling == "po2":
        assert torch.equal(torch.log2(scale), torch.round(torch.log2(scale)))
    if scaling in ("percentile", "mse"):
        ref = _quant_weight(real_fc1, LayerSpec(bits, "max", granularity))
        w = real_fc1.weight.detach()
        err, ref_err = (qw.value - w).norm().item(), (ref.value - w).norm().item()
        if scaling == "percentile":
            assert not torch.equal(scale, ref.scale.detach())
        else:  # MSE scaling never reconstructs worse than max scaling, and clips below max at low bits
            assert err <= ref_err * (1 + 1e-6)
            assert bits > 6 or err < ref_err


def test_original_model_is_untouched_unless_inplace():
    model = Tiny()
    q = quantize(model, LayerwisePolicy(default=LayerSpec(4)))
    assert isinstance(model.conv, nn.Conv2d) and not isinstance(model.conv, qnn.QuantConv2d)
    changes = layer_changes(model, q)
    assert [c.name for c in changes] == ["conv", "head.fc"]
    assert changes[0].old == "Conv2d float" and changes[0].new.startswith("QuantConv2d 4b")
    same = quantize(model, LayerwisePolicy(default=LayerSpec(4)), inplace=True)
    assert same is model and isinstance(model.conv, qnn.QuantConv2d)


def test_8bit_per_channel_logits_match_float_on_real_images(fmnist_test_1k):
    model, _ = load_float_model("cnn-pgd")
    x = fmnist_test_1k[0][:256]
    q = quantize(model, LayerwisePolicy(default=LayerSpec(8, "max", "per_channel"))).eval()
    with torch.no_grad():
        f, g = model(x), q(x)
    rel = ((g - f).norm() / f.norm()).item()
    assert rel < 0.02, rel


def test_vgg_with_bn_kept_and_folded(fmnist_test_1k):
    torch.manual_seed(0)
    model = build_model("vgg_bn")
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(fmnist_test_1k[0][:64])  # non-trivial BN running stats
    model.eval()
    x = fmnist_test_1k[0][:64]
    kept = quantize(model, LayerwisePolicy(default=LayerSpec(8))).eval()
    folded = quantize(model, LayerwisePolicy(default=LayerSpec(8)), fold_bn=True).eval()
    assert isinstance(kept.block1.bn, nn.BatchNorm2d) and isinstance(folded.block1.bn, nn.Identity)
    with torch.no_grad():
        f = model(x)
        for q in (kept, folded):
            assert ((q(x) - f).norm() / f.norm()).item() < 0.03


def test_activation_quantizers_signedness_and_calibration(fmnist_test_1k):
    model, _ = load_float_model("cnn-pgd")
    x = fmnist_test_1k[0][:256]
    q = quantize(model, LayerwisePolicy(default=LayerSpec(8, act_bit_width=8)), calibration_data=x).eval()
    conv1_in, conv2_in, fc2_in = (input_quantizer(q, n) for n in ("conv1", "conv2", "fc2"))
    assert not conv1_in.is_signed and not fc2_in.is_signed  # images, ReLU outputs
    assert int(conv2_in.bit_width()) == 8
    with torch.no_grad():
        f, g = model(x), q(x)
    assert ((g - f).norm() / f.norm()).item() < 0.05
    assert (g.argmax(1) == f.argmax(1)).float().mean() > 0.95


def test_apply_policy_rebits_an_existing_brevitas_model():
    class UserNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = qnn.QuantIdentity(bit_width=8, return_quant_tensor=False)
            self.conv = qnn.QuantConv2d(1, 8, 3, bias=False, weight_bit_width=8)
            self.bn = nn.BatchNorm2d(8)
            self.act = qnn.QuantReLU(bit_width=8)
            self.fc = qnn.QuantLinear(8 * 26 * 26, 10, bias=True, weight_bit_width=8)

        def forward(self, x):
            return self.fc(self.act(self.bn(self.conv(self.inp(x)))).flatten(1))

    torch.manual_seed(0)
    net = UserNet()
    w_before = net.conv.weight.detach().clone()
    policy = LayerwisePolicy(
        {"conv": LayerSpec(3, "mse", "per_channel"), "fc": LayerSpec(2, "max", "per_tensor")}
    )
    q = apply_policy(net, policy)
    assert int(q.conv.quant_weight().bit_width) == 3 and int(q.fc.quant_weight().bit_width) == 2
    assert int(net.conv.quant_weight().bit_width) == 8  # original untouched
    assert torch.equal(q.conv.weight, w_before)
    assert (
        layer_changes(net, q)[0].old == "QuantConv2d 8b max pt a8"
        and layer_changes(net, q)[0].new == "QuantConv2d 3b mse pc a8"
    )
    assert q(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(PolicyError, match="plain Conv2d"):
        apply_policy(build_model("small_cnn"), LayerwisePolicy(default=LayerSpec(4)))


def test_shared_module_needs_one_spec():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = self.a  # one module, two names

        def forward(self, x):
            return self.b(self.a(x))

    with pytest.raises(PolicyError, match="shared module"):
        quantize(Shared(), LayerwisePolicy({"a": LayerSpec(4)}, default=LayerSpec(8)))
    q = quantize(Shared(), LayerwisePolicy(default=LayerSpec(4)))
    assert q(torch.rand(2, 4)).shape == (2, 4)


def test_unsupported_layers_are_named_in_a_warning():
    model = nn.Sequential(nn.Conv3d(1, 2, 1), nn.Flatten(), nn.Linear(2 * 2 * 2 * 2, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quantize(model, LayerwisePolicy(default=LayerSpec(4)))
    assert any("0 (Conv3d)" in str(w.message) for w in caught)
    assert isinstance(q[2], qnn.QuantLinear)


def test_no_quantizable_layers_is_an_error():
    with pytest.raises(PolicyError, match="no quantizable layers"):
        quantize(nn.Sequential(nn.ReLU()), LayerwisePolicy(default=LayerSpec(4)))


def test_conv1d_and_convtranspose():
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3, stride=2),
        nn.Flatten(),
        nn.Unflatten(1, (3, 1, 3)),
        nn.ConvTranspose2d(3, 2, 2, stride=2, output_padding=1),
    )
    x = torch.rand(2, 2, 7)
    q = quantize(model, LayerwisePolicy(default=LayerSpec(8)))
    assert isinstance(q[0], qnn.QuantConv1d) and isinstance(q[3], qnn.QuantConvTranspose2d)
    with torch.no_grad():
        assert torch.allclose(q(x), model(x), atol=0.05)


def test_quantized_checkpoint_round_trip(tmp_path, fmnist_test_1k):
    model, _ = load_float_model("cnn-pgd")
    x = fmnist_test_1k[0][:128]
    policy = LayerwisePolicy(
        {
            "conv1": LayerSpec(8, act_bit_width=8),
            "conv2": LayerSpec(4, "mse"),
            "fc1": LayerSpec(2, "percentile", "per_tensor"),
            "fc2": LayerSpec(1, "po2"),
        }
    )
    q = quantize(model, policy, calibration_data=x).eval()
    save_quantized(q, tmp_path / "q.pt", {"arch": "small_cnn"})
    back, meta = load_quantized(tmp_path / "q.pt")
    assert meta["policy"]["layers"]["fc2"]["weight_bit_width"] == 1
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    assert int(back.fc2.quant_weight().bit_width) == 1


def test_save_and_load_a_user_model_without_a_reference_architecture(tmp_path):
    """A user's own nn.Module round-trips when the float model is passed as the skeleton."""
    from aq_brevitas.errors import CheckpointError

    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.rand(8, 2, 5, 5)
    q = quantize(
        model,
        LayerwisePolicy(default=LayerSpec(3, "mse", "per_channel", act_bit_width=6)),
        calibration_data=x,
    )
    save_quantized(q.eval(), tmp_path / "user.pt")
    with pytest.raises(CheckpointError, match="float_model"):
        load_quantized(tmp_path / "user.pt")
    back, meta = load_quantized(tmp_path / "user.pt", float_model=Tiny())
    assert "arch" not in meta
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


def test_bit_width_survives_state_dict_into_a_differently_built_layer():
    from aq_brevitas.quantization.injectors import weight_quant_for

    src = qnn.QuantLinear(12, 5, weight_quant=weight_quant_for(LayerSpec(3, "mse", "per_channel")))
    dst = qnn.QuantLinear(12, 5, weight_quant=weight_quant_for(LayerSpec(8, "mse", "per_channel")))
    src.quant_weight(), dst.quant_weight()  # MSE scales are initialised on first use
    dst.load_state_dict(src.state_dict())
    assert int(dst.quant_weight().bit_width) == 3
    assert torch.equal(dst.quant_weight().value, src.quant_weight().value)


def test_bias_correction_reduces_output_error_on_held_out_images(fmnist_val_512):
    """Brevitas bias_correction_mode over calibration images pulls a 3-bit VGG-BN closer to float."""
    model, _ = load_float_model("vgg-pgd")
    calib, held_out = fmnist_val_512[0][:128], fmnist_val_512[0][128:384]
    policy = LayerwisePolicy(default=LayerSpec(3, "max", "per_tensor"))
    with torch.no_grad():
        ref = model.eval()(held_out)

        def rel_err(q: nn.Module) -> float:
            return float((q.eval()(held_out) - ref).norm() / ref.norm())

        plain = rel_err(quantize(model, policy, calibration_data=calib))
        corrected = rel_err(quantize(model, policy, calibration_data=calib, bias_correction=True))
    assert corrected < 0.95 * plain, (plain, corrected)


def test_a_result_carrying_a_policy_quantizes_like_the_policy():
    """quantize(model, search_policy(...)) keeps working now that search returns a typed result."""
    from types import SimpleNamespace

    model = build_model("small_cnn")
    policy = LayerwisePolicy(default=LayerSpec(4))
    direct = quantize(model, policy)
    carried = quantize(model, SimpleNamespace(policy=policy))
    assert (
        read_policy(carried)
        == read_policy(direct)
        == LayerwisePolicy(policy.resolve(read_policy(direct).layers))
    )
    assert layer_changes(model, carried) == layer_changes(model, direct)
    with pytest.raises(PolicyError, match="policy is a SimpleNamespace, not a LayerwisePolicy"):
        quantize(model, SimpleNamespace(policy={"fc1": 4}))
