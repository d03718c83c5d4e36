import itertools

import onnx
import pytest
import torch

from aq_brevitas.convert import quantize
from aq_brevitas.errors import ConfigError, ModelError
from aq_brevitas.export import export_qcdq, export_qonnx, finn_check, inference_cost
from aq_brevitas.layers import quantizable_layers
from aq_brevitas.models import build_model, load_float_model
from aq_brevitas.policy import LayerSpec, LayerwisePolicy

MIX = [
    LayerSpec(8, "max", "per_channel", act_bit_width=8),
    LayerSpec(5, "mse", "per_tensor", act_bit_width=8),
    LayerSpec(3, "po2", "per_channel", act_bit_width=8),
    LayerSpec(2, "percentile", "per_tensor", act_bit_width=6),
    LayerSpec(1, "max", "per_tensor", act_bit_width=4),
    LayerSpec(4, "po2", "per_tensor", act_bit_width=8),
]


def _mixed_policy(model):
    names = list(quantizable_layers(model))
    return LayerwisePolicy({n: s for n, s in zip(names, itertools.cycle(MIX), strict=False)})


def _resnet(x):
    torch.manual_seed(0)
    m = build_model("small_resnet").train()
    with torch.no_grad():
        m(x)  # give BatchNorm non-trivial running statistics
    return m.eval()


@pytest.mark.parametrize("which", ["cnn-pgd", "vgg-pgd", "small_resnet", "vgg-pgd-folded"])
def test_qonnx_parity_widths_and_cost(which, tmp_path, fmnist_test_1k):
    x = fmnist_test_1k[0][:64]
    model = _resnet(x) if which == "small_resnet" else load_float_model(which.replace("-folded", ""))[0]
    policy = _mixed_policy(model)
    q = quantize(model, policy, calibration_data=x, fold_bn=which.endswith("folded")).eval()
    path = tmp_path / "m.onnx"
    res = export_qonnx(q, path, x[:1], images=fmnist_test_1k[0][100:104])
    assert res.max_abs_diff <= 1e-5 and res.images_checked == 5
    assert res.layer_bits == {n: s.weight_bit_width for n, s in policy.layers.items()}
    assert res.bipolar_layers == [n for n, s in policy.layers.items() if s.weight_bit_width == 1]
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert sum(n.op_type == "BipolarQuant" for n in graph.graph.node) == len(res.bipolar_layers)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no .onnx.data side files, no temp files
    cost = inference_cost(path)
    assert cost["total"]["total_mem_w_bits"] == policy.cost(q, x[:1]).weight_bits


def test_qcdq_parity_in_onnxruntime(tmp_path, fmnist_test_1k):
    model, _ = load_float_model("cnn-pgd")
    x = fmnist_test_1k[0][:32]
    policy = LayerwisePolicy(default=LayerSpec(4, "max", "per_channel", act_bit_width=8))
    q = quantize(model, policy, calibration_data=x).eval()
    res = export_qcdq(q, tmp_path / "m.onnx", x[:1], images=x[1:5])
    assert res.max_abs_diff <= 1e-5, res.max_abs_diff
    assert res.ort_basic_diff is not None
    with pytest.raises(ConfigError, match="1-bit"):
        export_qcdq(quantize(model, LayerwisePolicy(default=LayerSpec(1))), tmp_path / "b.onnx", x[:1])
    assert not (tmp_path / "b.onnx").exists()


def test_finn_check(tmp_path, fmnist_test_1k):
    model, _ = load_float_model("cnn-pgd")
    x = fmnist_test_1k[0][:32]
    po2 = LayerwisePolicy(default=LayerSpec(4, "po2", "per_channel", act_bit_width=8))
    export_qonnx(quantize(model, po2, calibration_data=x).eval(), tmp_path / "a.onnx", x[:1])
    checks = {c.name: c.passed for c in finn_check(tmp_path / "a.onnx", po2)}
    assert all(checks.values()), checks
    weight_only = LayerwisePolicy(default=LayerSpec(4))
    export_qonnx(quantize(model, weight_only).eval(), tmp_path / "b.onnx", x[:1])
    checks = {c.name: c.passed for c in finn_check(tmp_path / "b.onnx", weight_only)}
    assert checks["input_quantized"] is False


def test_bad_models_and_files(tmp_path):
    with pytest.raises(ModelError, match="no Brevitas quantized layers"):
        export_qonnx(build_model("small_cnn"), tmp_path / "x.onnx", torch.rand(1, 1, 28, 28))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ModelError, match="not a readable ONNX"):
        inference_cost(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        finn_check(tmp_path / "none.onnx")
    assert not (tmp_path / "x.onnx").exists()
