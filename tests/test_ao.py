import copy
import warnings

import pytest
import torch
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

from aq_brevitas.ao import convert_pt2e_model, prepare_pt2e_model, to_qconfig_mapping, weight_range
from aq_brevitas.convert import quantize
from aq_brevitas.errors import PolicyError
from aq_brevitas.evaluate import accuracy, attack_accuracy
from aq_brevitas.models import load_float_model
from aq_brevitas.policy import LayerSpec, LayerwisePolicy

# torch 2.13 deprecates FX graph mode on every call ("migrate to torchao pt2e"): expected, filtered here only.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*torchao.*pt2e.*:DeprecationWarning",
    "ignore:.*torch.ao.quantization.*deprecated.*:DeprecationWarning",
)

MIXED = LayerwisePolicy(
    {
        "conv1": LayerSpec(8, "max", "per_channel"),
        "conv2": LayerSpec(4, "max", "per_tensor"),
        "fc1": LayerSpec(2, "max", "per_channel"),
        "fc2": LayerSpec(8, "max", "per_tensor"),
    }
)


@pytest.fixture(scope="module")
def cnn():
    return load_float_model("cnn-pgd")[0]


def test_fx_qat_convert_keeps_narrow_ranges(cnn, fmnist_val_512):
    x = fmnist_val_512[0][:128]
    prepared = prepare_qat_fx(copy.deepcopy(cnn).train(), to_qconfig_mapping(MIXED, qat=True), (x[:1],))
    with torch.no_grad():
        prepared(x)
    fq_acc = accuracy(prepared, x, fmnist_val_512[1][:128])
    converted = convert_fx(prepared.eval())
    found = {}
    for name, mod in converted.named_modules():
        if name in MIXED.layers:
            q = mod.weight().int_repr()
            found[name] = (int(q.min()), int(q.max()))
    assert set(found) == set(MIXED.layers)  # conv-relu / linear-relu were fused and kept their names
    for name, (lo, hi) in found.items():
        qmin, qmax = weight_range(MIXED.layers[name].weight_bit_width)
        assert qmin <= lo and hi <= qmax, (name, lo, hi)
    assert abs(accuracy(converted, x, fmnist_val_512[1][:128]) - fq_acc) < 0.05


def test_pt2e_qat_fake_quant_matches_convert(cnn, fmnist_val_512):
    x = fmnist_val_512[0][:128]
    prepared = prepare_pt2e_model(copy.deepcopy(cnn), MIXED, x[:2], qat=True)
    with torch.no_grad():
        prepared(x)
    prepared.eval()
    with torch.no_grad():
        fq = prepared(x)
    converted = convert_pt2e_model(prepared)
    with torch.no_grad():
        out = converted(x)
    assert (fq.argmax(1) == out.argmax(1)).float().mean() > 0.97
    ranges = []
    for n in converted.graph.nodes:
        if "dequantize_per" in str(n.target) and torch.int8 in n.args:
            k = n.args.index(torch.int8)
            ranges.append((n.args[k - 2], n.args[k - 1]))
    assert sorted(ranges) == sorted(weight_range(s.weight_bit_width) for s in MIXED.layers.values())


def test_pgd_runs_on_prepared_fx_and_pt2e_models(cnn, fmnist_val_512):
    x, y = fmnist_val_512[0][:64], fmnist_val_512[1][:64]
    fx = prepare_qat_fx(copy.deepcopy(cnn).train(), to_qconfig_mapping(MIXED, qat=True), (x[:1],))
    pe = prepare_pt2e_model(copy.deepcopy(cnn), MIXED, x[:2], qat=True)
    for model in (fx, pe):
        with torch.no_grad():
            model(x)
        clean = accuracy(model, x, y)
        robust = attack_accuracy(model, x, y, "pgd", eps=0.1, steps=5)
        assert robust < clean


@pytest.mark.parametrize("bits", [8, 4])
def test_torch_ao_and_brevitas_agree_on_accuracy(cnn, bits, fmnist_test_1k, fmnist_val_512):
    x, y = fmnist_test_1k
    calib = fmnist_val_512[0][:256]
    policy = LayerwisePolicy.uniform(
        ["conv1", "conv2", "fc1", "fc2"], LayerSpec(bits, "max", "per_channel", act_bit_width=8)
    )
    brevitas_acc = accuracy(quantize(cnn, policy, calibration_data=calib), x, y)
    prepared = prepare_fx(copy.deepcopy(cnn).eval(), to_qconfig_mapping(policy), (x[:1],))
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
    from aq_brevitas.finetune import adversarial_finetune

    data = (fmnist_val_512[0][:64], fmnist_val_512[1][:64])
    fx = prepare_qat_fx(copy.deepcopy(cnn).train(), to_qconfig_mapping(MIXED, qat=True), (data[0][:1],))
    pe = prepare_pt2e_model(copy.deepcopy(cnn), MIXED, data[0][:2], qat=True)
    for model in (fx, pe):
        hist = adversarial_finetune(model, data, eps=0.1, steps=2, epochs=1, batch_size=32, progress=False)
        assert hist.epochs[0].adv_acc is not None and hist.epochs[0].loss > 0
