import pytest
import torch

from aq_brevitas.candidates import candidate_table, default_candidates
from aq_brevitas.convert import quantize
from aq_brevitas.errors import PolicyError
from aq_brevitas.lipschitz import operator_norm
from aq_brevitas.models import build_model
from aq_brevitas.nnutils import bn_scale
from aq_brevitas.policy import LayerSpec, LayerwisePolicy


@pytest.fixture(scope="module")
def vgg_and_x():
    torch.manual_seed(0)
    model = build_model("vgg_bn")
    model.train()
    with torch.no_grad():
        model(torch.rand(32, 1, 28, 28))  # non-trivial BN statistics
    return model.eval(), torch.rand(8, 1, 28, 28)


def test_table_uses_the_swap_quantizer(vgg_and_x):
    model, x = vgg_and_x
    specs = [
        LayerSpec(3, "mse", "per_channel"),
        LayerSpec(2, "percentile", "per_tensor"),
        LayerSpec(5, "po2", "per_channel"),
    ]
    table = candidate_table(model, x, specs, gains=("spectral",))
    for spec in specs:
        q = quantize(model, LayerwisePolicy(default=spec))
        for name in ("block2.conv", "fc1"):
            row = table.row(name, spec)
            layer, qlayer = model.get_submodule(name), q.get_submodule(name)
            score = table.scores[name]
            scale = bn_scale(model.get_submodule(score.bn)) if score.bn else None
            dw = qlayer.quant_weight().value.detach() - layer.weight.detach()
            expected, _ = operator_norm(layer, score.input_shape, weight=dw, out_scale=scale)
            assert row.dW_norm == pytest.approx(expected, rel=1e-4)


def test_error_shrinks_with_bits_and_costs_add_up(vgg_and_x):
    model, x = vgg_and_x
    table = candidate_table(model, x, [LayerSpec(b) for b in (2, 4, 8)])
    for name, rows in table.rows.items():
        errs = [r.dW_norm for r in rows]
        assert errs[0] > errs[1] > errs[2] > 0, name
        assert abs(rows[2].L_hat / table.scores[name].L - 1) < 0.02
        params = table.scores[name].params
        assert [r.weight_bits for r in rows] == [2 * params, 4 * params, 8 * params]
        assert rows[1].bops == table.scores[name].macs * 4 * 8


def test_per_layer_candidates_and_errors(vgg_and_x):
    model, x = vgg_and_x
    table = candidate_table(model, x, {"block1.conv": [LayerSpec(8)], "*": [LayerSpec(4), LayerSpec(2)]})
    assert [r.spec for r in table.rows["block1.conv"]] == [LayerSpec(8)]
    assert len(table.rows["fc2"]) == 2
    with pytest.raises(PolicyError, match="'nope'"):
        candidate_table(model, x, {"nope": [LayerSpec(8)]})
    assert len(default_candidates()) == 36


@pytest.mark.parametrize("fold_bn", [False, True])
def test_table_matches_the_swap_with_and_without_bn_folding(vgg_and_x, fold_bn):
    from aq_brevitas.nnutils import folded_weight

    model, x = vgg_and_x
    spec, name = LayerSpec(3, "max", "per_tensor"), "block2.conv"
    table = candidate_table(model, x, [spec], fold_bn=fold_bn)
    q = quantize(model, LayerwisePolicy(default=spec), fold_bn=fold_bn)
    layer, bn = model.get_submodule(name), model.get_submodule(name.replace("conv", "bn"))
    shape = table.scores[name].input_shape
    w_hat = q.get_submodule(name).quant_weight().value.detach()
    if fold_bn:  # the swap quantized the folded weight: no BatchNorm left after the conv
        dw, scale = w_hat - folded_weight(layer, bn)[0], None
    else:  # the swap quantized the conv weight; the float BatchNorm scales its output
        dw, scale = w_hat - layer.weight.detach(), bn_scale(bn)
    expected, _ = operator_norm(layer, shape, weight=dw, out_scale=scale, tol=1e-7)
    assert table.row(name, spec).dW_norm == pytest.approx(expected, rel=1e-4)
    assert table.fold_bn is fold_bn and (table.scores[name].bn is None) is fold_bn
