import math
import warnings
from dataclasses import replace

import pytest
import torch

from aq_brevitas.errors import PolicyError
from aq_brevitas.folding import bn_scale
from aq_brevitas.models import build_model
from aq_brevitas.policy import LayerSpec, LayerwisePolicy, layer_cost
from aq_brevitas.quantization.convert import quantize
from aq_brevitas.score.norms import operator_norm
from aq_brevitas.search.candidates import candidate_table, default_candidates, quantized_weight


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
    table = candidate_table(model, x, specs)
    for spec in specs:
        q = quantize(model, LayerwisePolicy(default=spec))
        for name in ("block2.conv", "fc1"):
            row = table.row(name, spec)
            layer, qlayer = model.get_submodule(name), q.get_submodule(name)
            score = table.scores[name]
            scale = bn_scale(model.get_submodule(score.bn)) if score.bn else None
            dw = qlayer.quant_weight().value.detach() - layer.weight.detach()
            expected = operator_norm(layer, score.input_shape, weight=dw, out_scale=scale).sigma
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
    from aq_brevitas.folding import folded_weight

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
    expected = operator_norm(layer, shape, weight=dw, out_scale=scale, tol=1e-7).sigma
    assert table.row(name, spec).dW_norm == pytest.approx(expected, rel=1e-4)
    assert table.fold_bn is fold_bn and (table.scores[name].bn is None) is fold_bn


# -- no wasted work (issue 17): norms only when asked, once per distinct Ŵ, cached in the table ---------------
@pytest.fixture
def norm_calls(monkeypatch):
    """Counts the table's two ways into a power iteration: the float basis and the batched norms."""
    import aq_brevitas.search.candidates as cand

    calls = {"basis": 0, "norms": 0, "weights": 0}
    real_basis, real_norms = cand.operator_norm, cand.operator_norms

    def basis(*a, **kw):
        calls["basis"] += 1
        return real_basis(*a, **kw)

    def norms(*a, **kw):
        calls["norms"] += 1
        calls["weights"] += len(a[2])  # weights stacked in the call
        return real_norms(*a, **kw)

    monkeypatch.setattr(cand, "operator_norm", basis)
    monkeypatch.setattr(cand, "operator_norms", norms)
    return calls


SPECS = [LayerSpec(2, "max", "per_tensor"), LayerSpec(4), LayerSpec(8, "max"), LayerSpec(8, "mse")]


def test_norms_false_computes_none_and_fill_norms_only_the_missing(vgg_and_x, norm_calls):
    model, x = vgg_and_x
    table = candidate_table(model, x, SPECS, norms=False)
    assert norm_calls == {"basis": 0, "norms": 0, "weights": 0} and table.norm_count == 0
    assert all(math.isnan(r.L_hat) and math.isnan(r.dW_norm) for rows in table.rows.values() for r in rows)
    assert len(table.weights) == len(SPECS) * len(table.rows)  # Ŵ and costs are there
    full = candidate_table(model, x, SPECS)
    table.fill_norms(dw_norms=False)
    assert table.has_norms() and not table.has_norms(dw_norms=True)
    for name, rows in table.rows.items():
        assert [r.L_hat for r in rows] == [r.L_hat for r in full.rows[name]]
        assert all(math.isnan(r.dW_norm) for r in rows)
    before = dict(norm_calls)
    table.fill_norms()  # only the ‖ΔW‖ are missing now: no float basis, no L̂ again
    assert norm_calls["basis"] == before["basis"] and table.has_norms(dw_norms=True)
    assert norm_calls["norms"] - before["norms"] == len(table.rows)  # one batched call per layer
    for name, rows in table.rows.items():
        assert [(r.L_hat, r.dW_norm) for r in rows] == [(r.L_hat, r.dW_norm) for r in full.rows[name]]
    count = table.norm_count
    table.fill_norms()
    assert table.norm_count == count  # nothing left to compute


def test_act_bit_variants_and_identical_weights_share_one_norm(norm_calls):
    torch.manual_seed(0)
    model, x = build_model("small_cnn").eval(), torch.rand(8, 1, 28, 28)
    base = candidate_table(model, x, SPECS)
    n_base = dict(norm_calls)
    crossed = [LayerSpec(s.weight_bit_width, s.scaling, s.granularity, a) for a in (2, 8) for s in SPECS]
    table = candidate_table(model, x, crossed)
    assert table.norm_count == base.norm_count  # 2× the candidates, not one norm more
    assert {k: norm_calls[k] - n_base[k] for k in norm_calls} == n_base
    for name in table.rows:
        for s in crossed:
            ref = base.row(name, replace(s, act_bit_width=None))
            row = table.row(name, s)
            assert (row.L_hat, row.dW_norm, row.weight_bits) == (ref.L_hat, ref.dW_norm, ref.weight_bits)
            assert (row.weight_bits, row.bops) == layer_cost(
                s, table.scores[name].params, table.scores[name].macs
            )
            assert table.weights[(name, s)] is table.weights[(name, replace(s, act_bit_width=2))]
        # candidates whose quantizers give bit-identical Ŵ (here 8b max and 8b mse, if they agree) share it
        same = torch.equal(
            base.weights[(name, SPECS[2])], quantized_weight(model.get_submodule(name), SPECS[3])
        )
        assert (base.weights[(name, SPECS[2])] is base.weights[(name, SPECS[3])]) == same


def test_a_reused_table_recomputes_nothing_across_budgets_and_methods(norm_calls):
    from aq_brevitas.search import SearchConfig, search_policy

    torch.manual_seed(0)
    model = build_model("small_cnn").eval()
    x = torch.rand(16, 1, 28, 28)
    data = (x, model(x).argmax(1))
    table = candidate_table(model, x, [LayerSpec(2), LayerSpec(4), LayerSpec(8)])
    calls, count = dict(norm_calls), table.norm_count
    uniform, spectral = SearchConfig(method="uniform"), SearchConfig().replace(estimate="spectral")
    for budget, config in [("avg-bits=4", uniform), ("avg-bits=3", spectral), ("avg-bits=6", spectral)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no val_data: "unchecked"
            search_policy(model, data, budget, config=config, table=table, progress=False)
    assert norm_calls == calls and table.norm_count == count
