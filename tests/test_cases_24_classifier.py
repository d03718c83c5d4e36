"""Issue 24, items 5 and 6 (cases 21, 23, 24): the classifier contract and wrapped models.

* single-logit binary models, ``(N, 1)`` and ``(N,)``, float and quantized: accuracy by the sign of the
  logit, attacks on the two class logits ``[0, z]`` (CE on them is BCE), the report and the search;
* attacks by name read the class count (2, 3, 4 and 12 classes): each runs, or refuses in one line
  exactly where its loss needs more classes; the report skips and lists, and never claims, the rest;
* ``DataParallel`` / ``DistributedDataParallel`` models at the entry points, ``module.``-prefixed
  checkpoints, and state-dict errors in short form.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from aq_brevitas.attacks import MIN_CLASSES, class_count, make_attack, normalized_inputs
from aq_brevitas.classifier import class_logits, logit_view, unwrap_parallel
from aq_brevitas.config import AttackConfig, EvalConfig
from aq_brevitas.errors import CheckpointError, ConfigError, ModelError
from aq_brevitas.evaluate.accuracy import accuracy, attack_accuracy
from aq_brevitas.evaluate.robustness import evaluate_robustness
from aq_brevitas.evaluate.suite import ChainSettings, suite_accuracies
from aq_brevitas.export.qonnx import export_qonnx
from aq_brevitas.forward import as_xy
from aq_brevitas.models import build_model, load_float_model, load_weights, save_model
from aq_brevitas.policy import LayerSpec, LayerwisePolicy
from aq_brevitas.quantization.checkpoint import load_quantized, save_quantized
from aq_brevitas.quantization.convert import quantize
from aq_brevitas.search import SearchConfig, search_policy
from aq_brevitas.storage import save_checkpoint

torch.set_num_threads(1)

FAST = EvalConfig(
    eps=(0.1,),
    pgd_steps=3,
    square_queries=10,
    gradient_free_images=6,
    large_eps_images=6,
    suite_steps=3,
    suite_queries=10,
    autoattack="standard",
    indicators=False,
)
W4A4 = LayerwisePolicy(default=LayerSpec(4, act_bit_width=4))


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "-- fix:" in text, text
    return text


class Squeezed(nn.Module):
    """A binary model that returns its logit as ``(N,)`` (``BCEWithLogitsLoss(out, y.float())`` style)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


class TwoLogits(nn.Module):
    """The single-logit ``net`` written as the two class logits ``[0, z]`` by hand: the reference."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        return torch.cat([torch.zeros_like(z), z], 1)


@pytest.fixture(scope="module")
def binary() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A BCE-trained single-logit MLP (the topology of FINN's cybersecurity MLP, small) on data whose
    labels are not balanced, so that the share of label 0 is far from the accuracy."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(240, 32, generator=g) < 0.3).float()
    w = torch.randn(32, generator=g)
    score = x @ w
    y = (score > score.quantile(0.3)).long()  # 70 % ones
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(net(x)[:, 0], y.float()).backward()
        opt.step()
    return net.eval(), x, y


def sign_accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return ((net(x).reshape(-1) > 0).long() == y).float().mean().item()


# ------------------------------------------------------------------------ (21) single-logit models
def test_class_logits_reads_one_logit_as_the_two_classes_0_z():
    z = torch.tensor([[1.5], [-2.0], [0.0]])
    assert class_logits(z).tolist() == [[0.0, 1.5], [0.0, -2.0], [0.0, 0.0]]
    assert torch.equal(class_logits(z[:, 0]), class_logits(z))
    wide = torch.rand(3, 5)
    assert class_logits(wide) is wide
    # CE on [0, z] is the binary cross-entropy of z: the attacks' loss is the model's own
    y = torch.tensor([1, 0, 1])
    ce = nn.functional.cross_entropy(class_logits(z), y)
    assert torch.allclose(ce, nn.functional.binary_cross_entropy_with_logits(z[:, 0], y.float()))
    with pytest.raises(ModelError) as exc:
        class_logits(torch.rand(3, 2, 2))
    assert "(3, 2, 2)" in one_line(exc)


@pytest.mark.parametrize("form", ["(N, 1)", "(N,)"])
def test_accuracy_of_a_single_logit_model_is_by_the_sign_of_its_logit(binary, form):
    net, x, y = binary
    model = net if form == "(N, 1)" else Squeezed(net)
    true = sign_accuracy(net, x, y)
    share0 = (y == 0).float().mean().item()
    assert abs(true - share0) > 0.3  # the old answer would be far off
    assert accuracy(model, x, y) == pytest.approx(true, abs=1e-9)
    assert torch.equal(as_xy(x, model=model)[1], (net(x)[:, 0] > 0).long())  # labels from the model
    assert model(x[:4]).shape == ((4, 1) if form == "(N, 1)" else (4,))  # the model is left as it was


@pytest.mark.parametrize("name", ["pgd", "fgsm", "apgd-ce", "fab-t", "square"])
def test_attacks_on_a_single_logit_model_equal_those_on_its_two_logits_0_z(binary, name):
    net, x, y = binary
    cfg = AttackConfig(name, eps=0.1, steps=4, queries=15)
    single = attack_accuracy(Squeezed(net), x[:60], y[:60], cfg, seed=3)
    assert single == attack_accuracy(TwoLogits(net), x[:60], y[:60], cfg, seed=3)
    assert single <= accuracy(net, x[:60], y[:60])
    if name in ("pgd", "apgd-ce"):
        assert single < accuracy(net, x[:60], y[:60])  # the margin is attacked: some points flip


def test_report_on_a_single_logit_model_lists_what_ran(binary):
    net, x, y = binary
    report = evaluate_robustness(net, (x[:40], y[:40]), FAST, progress=False)
    assert report.clean_accuracy == pytest.approx(sign_accuracy(net, x[:40], y[:40]))
    ran = {r.attack for r in report.results}
    assert {"apgd-dlr", "apgd-t3", "apgd-t"}.isdisjoint(ran), ran  # DLR losses need 3 and 4 classes
    assert {"apgd-ce", "fab-t", "pgd"} <= ran
    assert set(report.skipped) == {"apgd-dlr", "apgd-t3", "autoattack apgd-t"}
    assert "2" in report.skipped["apgd-dlr"] and "3 classes" in report.skipped["apgd-dlr"]
    text = " ".join(report.notes)
    assert "APGD-T" not in text and "apgd-t3" not in text and "9 target" not in text
    assert "FAB-T (1 target class)" in text
    assert report.robust_accuracy(0.1) <= report.clean_accuracy


def test_a_quantized_single_logit_model_is_measured_through_its_twin(binary):
    net, x, y = binary
    q = quantize(net, W4A4, calibration_data=x[:64], fold_bn=True)
    with torch.no_grad():
        want = ((q(x)[:, 0] > 0).long() == y).float().mean().item()
    assert accuracy(q, x, y) == pytest.approx(want)
    assert attack_accuracy(q, x[:40], y[:40], AttackConfig("pgd", eps=0.1, steps=3)) <= accuracy(
        q, x[:40], y[:40]
    )


def test_search_runs_on_a_single_logit_model(binary):
    net, x, y = binary
    cfg = SearchConfig(candidates=[LayerSpec(2), LayerSpec(4), LayerSpec(8)]).replace(
        eps=0.05, steps=2, pgd_steps=2, val_images=32
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = search_policy(
            net, (x[:64], y[:64]), "avg-bits=4", config=cfg, val_data=(x[64:96], y[64:96]), progress=False
        )
    assert set(result.layers) == {"0", "3"}
    assert result.cost.avg_weight_bits <= 4
    assert result.winner in ("search", "uniform")


def test_logit_view_reaches_copies_made_inside_and_ends_with_its_block(binary):
    net, x, _ = binary
    with normalized_inputs(net, None):
        inner = copy.deepcopy(net)
        assert net(x[:3]).shape == inner(x[:3]).shape == (3, 2)
        with logit_view(net):  # nested: read once
            assert net(x[:3]).shape == (3, 2)
    assert net(x[:3]).shape == inner(x[:3]).shape == (3, 1)
    assert not net._forward_hooks


# ------------------------------------------------------------------------ (23) few classes
def _classifier(k: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small ``k``-class model on 1×4×4 images and labels it gets right."""
    torch.manual_seed(k)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, k)).eval()
    x = torch.rand(8, 1, 4, 4)
    return model, x, model(x).argmax(1)


TARGETED = ("apgd-t", "apgd-t3", "apgd-dlr", "fab-t", "autoattack", "square", "apgd-ce")


@pytest.mark.parametrize("k", [2, 3, 4, 12])
def test_attacks_by_name_read_the_class_count(k):
    model, x, y = _classifier(k)
    assert class_count(model, x) == k
    for name in TARGETED:
        cfg = AttackConfig(name, eps=0.1, steps=2, queries=10)
        if k < MIN_CLASSES.get(name, 2):
            with pytest.raises(ConfigError) as exc:
                attack_accuracy(model, x, y, cfg)
            assert f"{name} needs at least {MIN_CLASSES[name]} classes" in one_line(exc)
            assert f"the model has {k}" in str(exc.value)
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            acc = attack_accuracy(model, x, y, cfg)
        assert 0.0 <= acc <= 1.0
        notes = [str(w.message) for w in caught if "APGD-T left out" in str(w.message)]
        assert bool(notes) == (name == "autoattack" and k < 4), (name, k, notes)
    targets = make_attack(AttackConfig("apgd-t", eps=0.1, steps=2), model)
    if k >= 4:
        targets(x, y)
        assert targets.attack.n_target_classes == k - 1  # every other class, read from the model


def test_a_built_attack_with_a_given_class_count_refuses_at_once():
    model, *_ = _classifier(2)
    with pytest.raises(ConfigError) as exc:
        make_attack(AttackConfig("apgd-t3", eps=0.1), model, n_classes=2)
    assert "apgd-t3" in one_line(exc)


@pytest.mark.parametrize("k", [2, 4])
def test_report_and_suite_on_few_classes_list_exactly_what_ran(k):
    model, x, y = _classifier(k)
    report = evaluate_robustness(model, (x, y), FAST, progress=False)
    ran = {(r.attack, r.chain) for r in report.results}
    expect_skipped = {"apgd-dlr", "apgd-t3", "autoattack apgd-t"} if k == 2 else set()
    assert set(report.skipped) == expect_skipped
    assert (("apgd-t", "autoattack") in ran) == (k >= 4)
    assert (("apgd-t3", "suite") in ran) == (k >= 4)
    assert ("fab-t", "autoattack") in ran
    assert ("APGD-T (3 target classes)" in " ".join(report.notes)) == (k >= 4)
    acc = suite_accuracies(model, x, y, eps=0.1, settings=ChainSettings(steps=2, queries=10))
    assert ("apgd-dlr" in acc) == (k >= 3) and ("apgd-t3" in acc) == (k >= 4)


# ------------------------------------------------------------------------ (24) wrapped models
@pytest.fixture(scope="module")
def cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("small_cnn").eval()
    x = torch.rand(16, 1, 28, 28)
    return model, x, model(x).argmax(1)


def test_dataparallel_is_unwrapped_at_the_entry_points(cnn, tmp_path):
    model, x, y = cnn
    dp = nn.DataParallel(model)  # on a CPU it just calls the module
    plain = LayerwisePolicy(
        {"conv1": LayerSpec(8), "conv2": LayerSpec(3), "fc1": LayerSpec(2), "fc2": LayerSpec(8)}
    )
    q = quantize(dp, plain, calibration_data=x)
    assert not isinstance(q, nn.DataParallel)
    bits = {n: int(m.quant_weight().bit_width) for n, m in q.named_modules() if hasattr(m, "quant_weight")}
    assert bits == {"conv1": 8, "conv2": 3, "fc1": 2, "fc2": 8}
    assert plain.cost(dp, x[:1]) == plain.cost(model, x[:1])
    assert accuracy(dp, x, y) == accuracy(model, x, y) == 1.0
    assert attack_accuracy(dp, x, y, AttackConfig("fgsm", eps=0.05)) == attack_accuracy(
        model, x, y, AttackConfig("fgsm", eps=0.05)
    )
    res = export_qonnx(nn.DataParallel(q), tmp_path / "q.onnx", x[:1])  # no "pass another opset"
    assert res.layer_bits == bits
    save_quantized(nn.DataParallel(q), tmp_path / "q.pt", {"arch": "small_cnn"})
    back, _ = load_quantized(tmp_path / "q.pt")
    assert torch.equal(back(x), q(x))


def test_distributed_data_parallel_is_unwrapped(cnn, tmp_path):
    import torch.distributed as dist

    model, x, y = cnn
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
        assert unwrap_parallel(nn.DataParallel(ddp)) is ddp.module
        assert accuracy(ddp, x, y) == 1.0
        q = quantize(ddp, LayerwisePolicy({"fc1": LayerSpec(2)}, default=LayerSpec(4)))
        assert {n for n, m in q.named_modules() if hasattr(m, "quant_weight")} == {
            "conv1",
            "conv2",
            "fc1",
            "fc2",
        }
    finally:
        dist.destroy_process_group()


def test_a_checkpoint_saved_from_dataparallel_loads(cnn, tmp_path):
    model, x, _ = cnn
    path = tmp_path / "dp.pt"
    save_checkpoint(path, {"state_dict": nn.DataParallel(model).state_dict()}, meta={"arch": "small_cnn"})
    loaded, meta = load_float_model(str(path))
    assert meta["arch"] == "small_cnn" and torch.equal(loaded(x), model(x))
    save_model(nn.DataParallel(model), tmp_path / "saved.pt", {"arch": "small_cnn"})
    assert torch.equal(load_float_model(str(tmp_path / "saved.pt"))[0](x), model(x))


class Holder(nn.Module):
    """A model whose own layer is called ``module``: its keys start with ``module.`` and must stay so."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(3, 2)


def test_the_prefix_is_only_stripped_when_uniform_and_not_the_models_own():
    holder = Holder()
    load_weights(Holder(), holder.state_dict(), "h.pt", "architecture")  # its own keys load as they are
    sd = {"module.fc1.weight": torch.zeros(2, 3), "bias": torch.zeros(2)}  # not uniform: not stripped
    with pytest.raises(CheckpointError) as exc:
        load_weights(nn.Linear(3, 2), sd, "x.pt", "architecture")
    text = one_line(exc)
    assert (
        "re-create it" in text
        and "1 missing keys (weight)" in text
        and "1 unexpected keys (module.fc1.weight)" in text
    )


def test_a_state_dict_error_names_its_keys_in_short_form_with_the_fix(cnn):
    model, *_ = cnn
    lightning = {f"model.{k}": v for k, v in model.state_dict().items()}  # a Lightning-style prefix
    with pytest.raises(CheckpointError) as exc:
        load_weights(build_model("small_cnn"), lightning, "l.ckpt", "architecture 'small_cnn'")
    text = one_line(exc)
    assert "8 missing keys (conv1.weight, conv1.bias, conv2.weight and 5 more)" in text
    assert "8 unexpected keys (model.conv1.weight" in text
    assert "every key of the checkpoint starts with 'model.'" in text
    assert (
        "fix: strip it: torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(state_dict, 'model.')"
        in text
    )
    other = nn.Linear(4, 2)
    with pytest.raises(CheckpointError) as exc:
        load_weights(other, {"weight": torch.zeros(3, 4), "bias": torch.zeros(2)}, "s.pt", "architecture")
    assert "1 shapes differ (weight (3, 4) vs (2, 4)" in one_line(exc)


def test_a_whole_run_takes_a_single_logit_model(tmp_path):
    from aq_brevitas.pipeline.config import RunConfig
    from aq_brevitas.pipeline.data import RunData
    from aq_brevitas.pipeline.job import run

    torch.manual_seed(0)
    x = torch.rand(60, 1, 8, 8)
    y = (x.mean((1, 2, 3)) > 0.5).long()
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 1))
    tiny = RunConfig(
        calib_images=6, val_images=6, finetune_images=16, finetune_steps=1, test_images=8, pgd_steps=1,
        eval_eps=(0.1,), target="generic",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run(
            model,
            tmp_path / "r",
            tiny,
            data=RunData(train=(x[:48], y[:48]), test=(x[48:56], y[48:56])),
            progress=False,
        )
    assert not result.skipped
    with torch.no_grad():
        want = ((model(x[48:56])[:, 0] > 0).long() == y[48:56]).float().mean().item()
    assert result.rows[0].clean == pytest.approx(want)  # the float row: by the sign of the logit
    assert model(x[:2]).shape == (2, 1)
