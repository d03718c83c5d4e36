import copy
import operator
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

from aq_brevitas.ao import (
    FX_DEPRECATION_MESSAGE,
    PolicyQuantizer,
    act_range,
    convert_pt2e_model,
    prepare_fx_model,
    prepare_pt2e_model,
    to_qconfig_mapping,
    weight_range,
)
from aq_brevitas.ao.fx import _is_act_observer
from aq_brevitas.ao.pt2e import _layer_name
from aq_brevitas.config import AttackConfig, EvalConfig, TrainConfig
from aq_brevitas.errors import PolicyError
from aq_brevitas.evaluate.accuracy import accuracy, attack_accuracy
from aq_brevitas.evaluate.robustness import evaluate_robustness
from aq_brevitas.models import load_float_model
from aq_brevitas.policy import LayerSpec, LayerwisePolicy
from aq_brevitas.quantization.convert import quantize
from conftest import REPO

# torch 2.13 deprecates FX graph mode on every call ("migrate to torchao pt2e"): expected, filtered here only.
pytestmark = pytest.mark.filterwarnings(f"ignore:{FX_DEPRECATION_MESSAGE}:DeprecationWarning")

LAYERS = ["conv1", "conv2", "fc1", "fc2"]
MIXED = LayerwisePolicy(
    {
        "conv1": LayerSpec(8, "max", "per_channel"),
        "conv2": LayerSpec(4, "max", "per_tensor"),
        "fc1": LayerSpec(2, "max", "per_channel"),
        "fc2": LayerSpec(8, "max", "per_tensor"),
    }
)
# Every scaling x granularity, two policies of four layers; per-tensor mse/percentile at 4 bits on fc1
# (its weights clip there: the case that once gave -8).
EVERY_RULE = [
    LayerwisePolicy(
        {
            "conv1": LayerSpec(3, "max", "per_tensor"),
            "conv2": LayerSpec(8, "po2", "per_tensor"),
            "fc1": LayerSpec(4, "mse", "per_tensor"),
            "fc2": LayerSpec(8, "percentile", "per_channel"),
        }
    ),
    LayerwisePolicy(
        {
            "conv1": LayerSpec(4, "po2", "per_channel"),
            "conv2": LayerSpec(2, "mse", "per_channel"),
            "fc1": LayerSpec(4, "percentile", "per_tensor"),
            "fc2": LayerSpec(8, "max", "per_channel"),
        }
    ),
]
# Distinct input bits per layer, so a bit width on the wrong tensor shows.
ACT_BITS = LayerwisePolicy({n: LayerSpec(8, act_bit_width=b) for n, b in zip(LAYERS, [2, 3, 4, 5])})


@pytest.fixture(scope="module")
def cnn():
    return load_float_model("cnn-pgd")[0]


def _fx_int_weights(converted: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight().int_repr() for n, m in converted.named_modules() if n in LAYERS}


def _pt2e_int_weights(converted: nn.Module) -> dict[str, torch.Tensor]:
    """The int8 weight constants of a convert_pt2e graph, by the layer that dequantizes and uses them."""
    found = {}
    for node in converted.graph.nodes:
        value = operator.attrgetter(node.target)(converted) if node.op == "get_attr" else None
        if isinstance(value, torch.Tensor) and value.dtype == torch.int8:
            (dequant,) = node.users
            (layer,) = dequant.users
            found[_layer_name(layer)] = value
    return found


def _assert_narrow(weights: dict[str, torch.Tensor], policy: LayerwisePolicy) -> None:
    assert set(weights) == set(policy.layers)
    for name, q in weights.items():
        qmin, qmax = weight_range(policy.layers[name].weight_bit_width)
        assert qmin <= int(q.min()) and int(q.max()) <= qmax, (name, int(q.min()), int(q.max()))
        assert int(q.abs().max()) == qmax, name  # the range is used, not just respected


@pytest.mark.parametrize("qat", [False, True], ids=["ptq", "qat"])
@pytest.mark.parametrize("policy", EVERY_RULE, ids=["rules-a", "rules-b"])
def test_every_scaling_rule_keeps_the_narrow_range_after_convert(cnn, fmnist_val_512, policy, qat):
    x = fmnist_val_512[0][:128]
    with pytest.warns(UserWarning, match="MinMax is used instead"):
        mapping = to_qconfig_mapping(policy, qat=qat)
    model = copy.deepcopy(cnn)
    fx = (
        prepare_qat_fx(model.train(), mapping, (x[:1],))
        if qat
        else prepare_fx(model.eval(), mapping, (x[:1],))
    )
    with pytest.warns(UserWarning, match="MinMax is used instead"):
        pe = prepare_pt2e_model(copy.deepcopy(cnn), policy, x[:2], qat=qat)
    with torch.no_grad():
        fx(x)
        pe(x)
    pe.eval()  # torchao's train/eval override returns None, so not chained
    _assert_narrow(_fx_int_weights(convert_fx(fx.eval())), policy)
    _assert_narrow(_pt2e_int_weights(convert_pt2e_model(pe)), policy)


def _fx_input_bits(prepared: nn.Module) -> dict[str, int]:
    """Bits of the observer that quantizes each layer's input (through max-pool/flatten), and of the output."""
    bits = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and node.target in LAYERS or node.op == "output":
            source = node.args[0]
            while not (
                source.op == "call_module" and _is_act_observer(prepared.get_submodule(source.target))
            ):
                source = source.args[0]
            observer = prepared.get_submodule(source.target)
            bits[node.target if node.op != "output" else "output"] = (
                observer.quant_max - observer.quant_min + 1
            ).bit_length() - 1
    return bits


@pytest.mark.parametrize("qat", [False, True], ids=["ptq", "qat"])
def test_fx_act_bits_quantize_each_layers_input(cnn, fmnist_val_512, qat):
    x = fmnist_val_512[0][:128]
    with pytest.warns(UserWarning, match="OUTPUT"):
        plain = to_qconfig_mapping(ACT_BITS, qat=qat)
    raw = prepare_fx(copy.deepcopy(cnn).eval(), plain, (x[:1],)) if not qat else None
    if raw is not None:  # torch.ao alone: fc2's input carries fc1's bits, the logits fc2's
        assert _fx_input_bits(raw)["fc2"] == 4 and _fx_input_bits(raw)["output"] == 5
    prepared = prepare_fx_model(copy.deepcopy(cnn), ACT_BITS, x[:1], qat=qat)
    expected = {n: s.act_bit_width for n, s in ACT_BITS.layers.items()}
    assert _fx_input_bits(prepared) == {**expected, "output": 8}
    if qat:  # fake-quant and convert_fx agree exactly, also with sub-8-bit activations behind max-pool
        with torch.no_grad():
            prepared(x)
        prepared.apply(torch.ao.quantization.disable_observer).eval()
        with torch.no_grad():
            fq, out = prepared(x), convert_fx(copy.deepcopy(prepared))(x)
        # a flip of one logit's code moves it one output level; a flipped fc2 input code j moves logit i
        # by s_in * |W[i, j]| before the output quantizer, so by at most that plus one level after it
        nodes = {n.target: n for n in prepared.graph.nodes}
        s_out = float(prepared.get_submodule(nodes["output"].args[0].target).scale)
        s_in = float(prepared.get_submodule(nodes["fc2"].args[0].target).scale)
        fc2 = prepared.get_submodule("fc2")
        w = float(fc2.weight_fake_quant(fc2.weight.detach()).abs().max())
        _assert_equal_but_for_flips(out, fq, s_out + s_in * w)


def _assert_equal_but_for_flips(out: torch.Tensor, fq: torch.Tensor, step: float) -> None:
    """Fake-quant and converted models compute the same codes, except a "flip": a quantizer input within
    float32 noise of a rounding boundary (the two sides compute it with other kernels or formulas,
    e.g. x * (1/s) against x / s, and the noise differs with the CPU) rounds to the neighbouring code.

    ``step`` is what one flip can move a logit by (derived at each call site). A flip needs the input
    within a few ulps, relative, of a boundary, i.e. within ~1e-6 of a step: it hits far fewer than 1 % of
    the images, while a wrong scale or zero-point would move most logits.
    """
    diff = (out - fq).abs()
    assert float(diff.max()) <= step * (1 + 2**-20), (float(diff.max()), step)
    assert float((diff.amax(1) > 0).float().mean()) <= 0.01, int((diff.amax(1) > 0).sum())


def test_fx_refuses_one_tensor_read_at_two_bit_widths():
    class Fork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(x)

    policy = LayerwisePolicy({"a": LayerSpec(8, act_bit_width=4), "b": LayerSpec(8, act_bit_width=6)})
    with pytest.raises(PolicyError, match=r"\['a', 'b'\] read the same tensor"):
        prepare_fx_model(Fork(), policy, torch.rand(2, 4))
    same = LayerwisePolicy({"a": LayerSpec(8, act_bit_width=4), "b": LayerSpec(8, act_bit_width=4)})
    assert _is_act_observer(prepare_fx_model(Fork(), same, torch.rand(2, 4)).activation_post_process_0)


def test_pt2e_raw_torchao_path_ptq_and_qat(cnn, fmnist_val_512):
    """torch.export + prepare_pt2e / prepare_qat_pt2e with PolicyQuantizer + convert_pt2e."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval, disable_observer
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer import Quantizer

    x = fmnist_val_512[0][:128]
    policy = LayerwisePolicy({n: LayerSpec(s.weight_bit_width, s.scaling, s.granularity, act_bit_width=b)
                              for (n, s), b in zip(MIXED.layers.items(), [2, 3, 4, 8])})  # fmt: skip
    outputs = {}
    for qat in (False, True):
        quantizer = PolicyQuantizer(policy, qat=qat)
        assert isinstance(quantizer, PolicyQuantizer) and isinstance(quantizer, Quantizer)
        model = copy.deepcopy(cnn).train() if qat else copy.deepcopy(cnn).eval()
        batch = torch.export.Dim("batch")
        exported = torch.export.export(model, (x[:2],), dynamic_shapes=({0: batch},)).module()
        prepared = (prepare_qat_pt2e if qat else prepare_pt2e)(exported, quantizer)
        allow_exported_model_train_eval(prepared)
        with torch.no_grad():
            prepared(x)  # one calibration batch: MinMax (PTQ) and moving-average (QAT) ranges agree
        prepared.apply(disable_observer).eval()
        with torch.no_grad():
            fq = prepared(x)
        converted = convert_pt2e(prepared)
        with torch.no_grad():
            outputs[qat] = converted(x)
        _assert_narrow(_pt2e_int_weights(converted), policy)
        act_bits = {
            _layer_name(n): n.args[0].args[3:5]
            for n in converted.graph.nodes
            if n.op == "call_function"
            and _layer_name(n) in policy.layers
            and "dequantize" in str(n.args[0].target)
        }
        assert act_bits == {n: act_range(s.act_bit_width) for n, s in policy.layers.items()}
        if qat:  # the same float linear on the same codes: equal but for a flip of fc2's input codes
            (linear,) = next(n for n in converted.graph.nodes if n.op == "output").args[0]
            s_in, s_w = float(linear.args[0].args[1]), float(linear.args[1].args[1])  # per-tensor fc2
            # one flipped input code j moves logit i by s_in * |W[i, j]|
            step = s_in * s_w * float(_pt2e_int_weights(converted)["fc2"].abs().max())
            _assert_equal_but_for_flips(outputs[qat], fq, step)
        else:  # the PTQ-prepared model only observes, it computes in float
            assert not torch.allclose(outputs[qat], fq, atol=1e-2)
    # Not equal: QAT observers downstream see fake-quantized activations, PTQ ones float activations.
    assert (outputs[False].argmax(1) == outputs[True].argmax(1)).float().mean() >= 0.95


def test_import_without_torchao_and_a_one_line_error():
    code = (
        "import sys; sys.modules['torchao'] = None\n"
        "import aq_brevitas as aq\n"
        "from aq_brevitas.ao import PolicyQuantizer\n"
        "policy = aq.LayerwisePolicy({'fc1': aq.LayerSpec(4)})\n"
        "aq.to_qconfig_mapping(policy)\n"
        "try:\n"
        "    aq.PolicyQuantizer(policy)\n"
        "except aq.AqError as e:\n"
        "    print(type(e).__name__, str(e))\n"
        "print('torchao loaded:', any(m.startswith('torchao.') for m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert (
        lines[0].startswith("ConfigError PolicyQuantizer needs torchao") and "aq-brevitas[pt2e]" in lines[0]
    )
    assert lines[1:] == ["torchao loaded: False"]


def test_evaluate_robustness_on_prepared_fx_and_pt2e(cnn, fmnist_val_512):
    from torchao.quantization.pt2e import disable_observer

    x, y = fmnist_val_512[0][:48], fmnist_val_512[1][:48]
    fx = prepare_fx_model(copy.deepcopy(cnn), MIXED, x[:1], qat=True)
    pe = prepare_pt2e_model(copy.deepcopy(cnn), MIXED, x[:2], qat=True)
    for model, freeze in ((fx, torch.ao.quantization.disable_observer), (pe, disable_observer)):
        with torch.no_grad():
            model(x)  # calibration, then the ranges are frozen (as docs/torch_ao.md does)
        model.apply(freeze)
        cfg = EvalConfig(
            eps=0.1, attacks=("clean", "pgd"), pgd_steps=3, gradient_free=False,
            large_eps_images=8, suite_steps=5, suite_queries=20,  # plumbing: few iterations
        )  # fmt: skip
        report = evaluate_robustness(model, (x, y), cfg, progress=False)
        assert report.images == 48 and report.clean_accuracy == pytest.approx(accuracy(model, x, y))
        assert report.accuracy("pgd", 0.1) < report.clean_accuracy
        assert report.max_violation <= 1e-6


def test_pgd_runs_on_prepared_fx_and_pt2e_models(cnn, fmnist_val_512):
    x, y = fmnist_val_512[0][:64], fmnist_val_512[1][:64]
    fx = prepare_qat_fx(copy.deepcopy(cnn).train(), to_qconfig_mapping(MIXED, qat=True), (x[:1],))
    pe = prepare_pt2e_model(copy.deepcopy(cnn), MIXED, x[:2], qat=True)
    for model in (fx, pe):
        with torch.no_grad():
            model(x)
        clean = accuracy(model, x, y)
        robust = attack_accuracy(model, x, y, AttackConfig("pgd", eps=0.1, steps=5))
        assert robust < clean


@pytest.mark.parametrize("bits", [8, 4])
def test_torch_ao_and_brevitas_agree_on_accuracy(cnn, bits, fmnist_test_1k, fmnist_val_512):
    x, y = fmnist_test_1k
    calib = fmnist_val_512[0][:256]
    policy = LayerwisePolicy.uniform(LAYERS, LayerSpec(bits, "max", "per_channel", act_bit_width=8))
    brevitas_acc = accuracy(quantize(cnn, policy, calibration_data=calib), x, y)
    prepared = prepare_fx_model(copy.deepcopy(cnn), policy, x[:1])
    with torch.no_grad():
        prepared(calib)
    ao_acc = accuracy(convert_fx(prepared), x, y)
    assert abs(ao_acc - brevitas_acc) <= 0.01, (ao_acc, brevitas_acc)


def test_unexpressible_specs_fail_or_warn():
    with pytest.raises(PolicyError, match="1-bit"):
        to_qconfig_mapping(LayerwisePolicy({"fc1": LayerSpec(1)}))
    with pytest.raises(PolicyError, match="act_bit_width=12"):
        to_qconfig_mapping(LayerwisePolicy({"fc1": LayerSpec(4, act_bit_width=12)}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        to_qconfig_mapping(LayerwisePolicy({"fc1": LayerSpec(4, "po2")}))
    assert any("fc1 (po2" in str(w.message) for w in caught)


def test_finetune_accepts_prepared_torch_ao_models(cnn, fmnist_val_512):
    from aq_brevitas.train.finetune import adversarial_finetune

    data = (fmnist_val_512[0][:64], fmnist_val_512[1][:64])
    fx = prepare_fx_model(copy.deepcopy(cnn), MIXED, data[0][:1], qat=True)
    pe = prepare_pt2e_model(copy.deepcopy(cnn), MIXED, data[0][:2], qat=True)
    for model in (fx, pe):
        cfg = TrainConfig.finetuning(eps=0.1, steps=2, epochs=1, batch_size=32)
        hist = adversarial_finetune(model, data, cfg, progress=False)
        assert hist.epochs[0].adv_acc is not None and hist.epochs[0].loss > 0
