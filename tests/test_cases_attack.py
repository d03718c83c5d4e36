"""Issue 14, the attack side: train/eval mode kept, converted integer models refused in one line,
inputs that are not images, and normalised models -- each on small models of our own."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from aq_brevitas.attacks import image_grid, make_attack, normalize, normalized_inputs
from aq_brevitas.config import AttackConfig, EvalConfig, TrainConfig, check_normalization
from aq_brevitas.errors import ConfigError, ModelError
from aq_brevitas.evaluate.accuracy import accuracy, attack_accuracy
from aq_brevitas.evaluate.report import RobustnessReport
from aq_brevitas.evaluate.robustness import evaluate_robustness
from aq_brevitas.policy import LayerSpec, LayerwisePolicy
from aq_brevitas.quantization.convert import quantize
from aq_brevitas.search import SearchConfig, search_policy
from aq_brevitas.train.finetune import adversarial_finetune
from aq_brevitas.train.training import adversarial_train
from conftest import ConvBNDropNet

SUITE = EvalConfig(
    eps=(0.1,),
    pgd_steps=3,
    square_queries=30,
    gradient_free_images=4,
    large_eps_images=4,
    suite="none",
)
PGD2 = AttackConfig("pgd", eps=0.1, steps=2)
MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "-- fix:" in text
    return text


# ----------------------------------------------------------------------------------- (d) train/eval mode
def BNDropNet() -> nn.Module:  # noqa: N802 -- reads as the model class it builds
    return ConvBNDropNet(4, 8, 5)


@pytest.fixture(scope="module")
def mode_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(12, 1, 8, 8, generator=g), torch.randint(0, 5, (12,), generator=g)


def _state(model: nn.Module) -> tuple[dict[str, bool], list[torch.Tensor]]:
    flags = {n: m.training for n, m in model.named_modules()}
    stats = [b.clone() for n, b in model.named_buffers() if "running" in n or "num_batches" in n]
    return flags, stats


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "brevitas"])
def test_measuring_gives_the_model_back_in_its_mode_with_bn_stats_untouched(mode_data, quantized):
    x, y = mode_data
    torch.manual_seed(0)
    model = BNDropNet()
    with torch.no_grad():
        model.train()(x)  # running statistics that are not the defaults
    if quantized:
        model = quantize(model, LayerwisePolicy(default=LayerSpec(4, act_bit_width=8)), calibration_data=x)
    calls = {
        "accuracy": lambda m: accuracy(m, x, y),
        "attack_accuracy": lambda m: attack_accuracy(m, x, y, PGD2),
        "attack_accuracy square": lambda m: attack_accuracy(m, x, y, AttackConfig("square", 0.1, queries=5)),
        "evaluate_robustness": lambda m: evaluate_robustness(m, (x, y), SUITE, progress=False).clean_accuracy,
        "make_attack": lambda m: make_attack(PGD2.replace(random_start=False), m)(x, y).sum().item(),
    }
    for label, call in calls.items():
        for setup in ("train", "mixed", "eval"):
            model.train(setup != "eval")
            if setup == "mixed":
                model.bn.eval()  # a frozen BatchNorm inside a training model keeps its own flag
            flags, stats = _state(model)
            first = call(model)
            assert _state(model)[0] == flags, f"{label} ({setup}) changed the train/eval flags"
            assert all(torch.equal(a, b) for a, b in zip(_state(model)[1], stats, strict=True)), label
            assert call(model) == first, f"{label} ({setup}) is not repeatable"  # eval mode: deterministic


def test_training_gives_the_model_back_in_its_mode(mode_data):
    x, y = mode_data
    for training in (True, False):
        torch.manual_seed(0)
        model = BNDropNet().train(training)
        adversarial_train(
            model, (x, y), TrainConfig(eps=0.1, steps=1, epochs=1, batch_size=6), progress=False
        )
        assert all(m.training == training for m in model.modules())
        q = quantize(BNDropNet(), LayerwisePolicy(default=LayerSpec(4))).train(training)
        cfg = TrainConfig.finetuning(eps=0.1, steps=1, epochs=1, batch_size=6)
        adversarial_finetune(q, (x, y), cfg, progress=False)
        assert all(m.training == training for m in q.modules())


# ------------------------------------------------------------------------ (e) converted integer models
@pytest.fixture(scope="module")
def ao_models(mode_data):
    from torch.ao.quantization.quantize_fx import convert_fx

    from aq_brevitas.ao import prepare_fx_model

    x, _ = mode_data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx_model(
            copy.deepcopy(model), LayerwisePolicy(default=LayerSpec(8, act_bit_width=8)), x[:1]
        )
        with torch.no_grad():
            prepared(x)
        converted = convert_fx(copy.deepcopy(prepared).eval())
    return prepared, converted


def test_a_converted_model_is_refused_in_one_line_naming_the_prepared_model(ao_models, mode_data):
    prepared, converted = ao_models
    x, y = mode_data
    assert 0 <= accuracy(converted, x, y) <= 1  # a clean forward is fine
    refusals = {
        "attack_accuracy pgd": lambda: attack_accuracy(converted, x, y, PGD2),
        "attack_accuracy fgsm": lambda: attack_accuracy(converted, x, y, AttackConfig("fgsm", 0.1)),
        "evaluate_robustness": lambda: evaluate_robustness(converted, (x, y), SUITE, progress=False),
        "make_attack": lambda: make_attack(PGD2, converted)(x, y),
    }
    for label, call in refusals.items():
        with pytest.raises(ModelError) as err:
            call()
        text = one_line(err)
        assert "no input gradient" in text and "prepared (fake-quant) model" in text, label
    # the gradient-free attack needs no input gradient; the prepared model is attackable
    assert 0 <= attack_accuracy(converted, x, y, AttackConfig("square", 0.1, queries=5)) <= 1
    assert 0 <= attack_accuracy(prepared, x, y, PGD2) <= 1


# --------------------------------------------------------------------------- (f) inputs that are not images
class Signal1D(nn.Module):
    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, 6, 5, padding=2)
        self.bn = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(-1))


def test_image_grid():
    assert image_grid((3, 28, 28)) == (3, 28, 28)
    assert image_grid((3, 1024)) == (3, 32, 32)
    assert image_grid((2, 96)) == (2, 8, 12)
    assert image_grid((64,)) == (1, 8, 8)
    assert image_grid((3, 1, 50)) == (3, 5, 10)  # an image one pixel high is folded too
    assert image_grid((4, 2, 3, 6)) == (4, 6, 6)
    assert image_grid((3, 13)) is None and image_grid((2,)) is None


def test_a_signal_batch_of_one_is_evaluated_with_square_on_its_grid_view():
    torch.manual_seed(0)
    model = Signal1D().eval()
    x = torch.rand(1, 3, 96)
    y = model(x).argmax(1)
    rep = evaluate_robustness(model, (x, y), SUITE.replace(autoattack=True), progress=False)
    attacks = [r.attack for r in rep.results]
    reference = {r.attack for r in rep.results if r.chain == "autoattack"}
    assert {"square", "pgd-subset"} <= set(attacks) and rep.skipped == {}
    assert reference == {"apgd-ce", "apgd-t", "fab-t", "square"}  # the reference AutoAttack, on the grid view
    assert rep.notes[0] == (
        "square and autoattack ran on a 3×8×12 view of the 3×96 samples (the model sees its own shape)"
    )
    assert rep.notes[1].startswith("AutoAttack: the reference version (Croce & Hein 2020)")
    assert rep.max_violation <= 1e-6 and rep.check("gradient_free_not_stronger").passed is not None
    assert "Notes:" in rep.to_markdown() and RobustnessReport.from_json(rep.to_json()) == rep
    adv = make_attack(AttackConfig("square", 0.1, queries=20), model)(x, y)
    assert adv.shape == x.shape and (adv - x).abs().max() <= 0.1 + 1e-6
    # a flat feature vector is a 1×h×w image to Square
    flat = nn.Sequential(nn.Linear(64, 4)).eval()
    xf = torch.rand(1, 64)
    assert 0 <= attack_accuracy(flat, xf, flat(xf).argmax(1), AttackConfig("square", 0.1, queries=10)) <= 1


def test_square_is_skipped_with_a_note_when_the_samples_have_no_grid():
    torch.manual_seed(0)
    model = Signal1D(2).eval()
    x = torch.rand(3, 2, 13)  # 13 is prime: no h×w view with h, w >= 2
    y = model(x).argmax(1)
    rep = evaluate_robustness(model, (x, y), SUITE.replace(autoattack=True), progress=False)
    attacks = [r.attack for r in rep.results]
    assert "square" not in attacks and "pgd-subset" not in attacks and "autoattack" not in attacks
    assert set(rep.skipped) == {"square", "autoattack"} and "2×13 samples" in rep.skipped["square"]
    check = rep.check("gradient_free_not_stronger")
    assert check.passed is None and "skipped" in check.detail
    md = rep.to_markdown()
    assert "Skipped attacks:" in md and "`square`" in md
    assert RobustnessReport.from_json(rep.to_json()).skipped == rep.skipped
    with pytest.raises(ConfigError) as err:
        make_attack(AttackConfig("square", 0.1, queries=5), model)(x, y)
    assert "square needs image-like inputs" in one_line(err)


# ------------------------------------------------------------------------------------ (g) normalised models
class RGBNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


class Normalising(nn.Module):
    """The same network normalising internally: the reference for ``normalization=``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
        return self.inner((x - mean) / std)


@pytest.fixture(scope="module")
def rgb():
    """A small RGB net trained on normalised inputs, and [0, 1] images with the labels it gives."""
    torch.manual_seed(0)
    model = RGBNet()
    x = torch.rand(48, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) * 5).long().clamp(0, 4)  # a learnable rule
    opt = torch.optim.Adam(model.parameters(), 0.01)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(normalize(x, (MEAN, STD))), y).backward()
        opt.step()
    return model.eval(), x, y


def test_normalization_equals_a_model_that_normalises_internally(rgb):
    model, x, y = rgb
    ref = Normalising(model)
    norm = (MEAN, STD)
    assert accuracy(model, x, y, normalization=norm) == accuracy(ref, x, y) > 0.5
    for attack in (
        AttackConfig("pgd", 8 / 255, 5),
        AttackConfig("fgsm", 8 / 255),
        AttackConfig("square", 8 / 255, queries=20),
    ):
        got = attack_accuracy(model, x, y, attack.replace(normalization=norm))
        assert got == attack_accuracy(ref, x, y, attack), attack
    a = evaluate_robustness(model, (x, y), SUITE.replace(normalization=norm), progress=False)
    b = evaluate_robustness(ref, (x, y), SUITE, progress=False)
    assert [(r.attack, r.accuracy) for r in a.results] == [(r.attack, r.accuracy) for r in b.results]
    assert a.max_violation <= 1e-6  # ε measured in pixel space
    atk = make_attack(AttackConfig("pgd", eps=8 / 255, steps=3, normalization=norm), model)
    torch.manual_seed(0)
    adv = atk(x, y)
    torch.manual_seed(0)
    assert torch.equal(adv, make_attack(AttackConfig("pgd", eps=8 / 255, steps=3), ref)(x, y))
    # an attack built with the normalisation is classified the way it attacked
    assert attack_accuracy(model, x, y, attack=atk) == attack_accuracy(
        ref, x, y, AttackConfig("pgd", 8 / 255, 3)
    )
    assert len(model._forward_pre_hooks) == 0  # nothing left on the model


def test_search_accepts_normalization_and_searches_the_normalised_model(rgb):
    model, x, y = rgb
    config = SearchConfig(
        candidates=[LayerSpec(2), LayerSpec(4), LayerSpec(8)], eps=0.05, pgd_steps=2, val_images=16
    ).replace(steps=2)
    data, val = (x[:24], y[:24]), (x[24:40], y[24:40])
    normalised = config.replace(normalization=(MEAN, STD))
    got = search_policy(model, data, "avg-bits=4", config=normalised, val_data=val, progress=False)
    ref = search_policy(Normalising(model), data, "avg-bits=4", config=config, val_data=val, progress=False)
    assert got.layers == {n.removeprefix("inner."): s for n, s in ref.layers.items()}
    # the scores too (the fx replay of the scores runs model.forward, which the hook does not see)
    assert got.layer_scores == {n.removeprefix("inner."): v for n, v in ref.layer_scores.items()}
    assert got.validation.search_accuracy == ref.validation.search_accuracy
    assert got.policy.meta["normalization"] == [list(MEAN), list(STD)]
    assert "normalization" not in ref.policy.meta  # the JSON of an unnormalised search is unchanged
    cfg = SearchConfig(normalization=[list(MEAN), list(STD)])
    assert cfg.normalization == (MEAN, STD) and SearchConfig.from_dict(cfg.to_dict()) == cfg


def test_finetuning_accepts_normalization_and_trains_the_normalised_model(rgb):
    model, x, y = rgb
    q = quantize(model, LayerwisePolicy(default=LayerSpec(4)))
    q_ref = Normalising(copy.deepcopy(q))
    cfg = TrainConfig.finetuning(eps=8 / 255, steps=2, epochs=1, batch_size=16, seed=1)
    h = adversarial_finetune(q, (x, y), cfg.replace(normalization=(MEAN, STD)), progress=False)
    h_ref = adversarial_finetune(q_ref, (x, y), cfg, progress=False)
    assert [e.adv_acc for e in h.epochs] == [e.adv_acc for e in h_ref.epochs]
    for (name, p), (_, p_ref) in zip(q.named_parameters(), q_ref.inner.named_parameters(), strict=True):
        assert torch.equal(p, p_ref), name  # the same (x - mean) / std and ops, in one process
    assert TrainConfig(normalization=(MEAN, STD)).attack().normalization == (MEAN, STD)


def test_a_mean_std_of_the_wrong_length_says_so_in_one_line(rgb):
    model, x, y = rgb
    bad = ((0.3, 0.3), (0.3, 0.3))
    calls = {
        "accuracy": lambda: accuracy(model, x, y, normalization=bad),
        "attack_accuracy": lambda: attack_accuracy(
            model, x, y, AttackConfig("pgd", 0.03, 2, normalization=bad)
        ),
        "evaluate_robustness": lambda: evaluate_robustness(
            model, (x, y), SUITE.replace(normalization=bad), progress=False
        ),
        "search_policy": lambda: search_policy(
            model, (x, y), "avg-bits=4", config=SearchConfig(normalization=bad), progress=False
        ),
        "adversarial_finetune": lambda: adversarial_finetune(
            model, (x, y), TrainConfig.finetuning(normalization=bad), progress=False
        ),
    }
    for label, call in calls.items():
        with pytest.raises(ConfigError) as err:
            call()
        assert "normalization has 2 mean/std values but the inputs have 3 channels" in one_line(err), label
    assert len(model._forward_pre_hooks) == 0
    # one value for every channel is fine; malformed values fail at once, in every config
    assert 0 <= accuracy(model, x, y, normalization=((0.3,), (0.3,))) <= 1
    for make in (AttackConfig, TrainConfig, EvalConfig, SearchConfig):
        with pytest.raises(ConfigError, match="normalization"):
            make(normalization=((0.5,), (0.0,)))
    assert check_normalization(((0.5,), (0.5,)), channels=7) == ((0.5,), (0.5,))


def test_normalized_inputs_nests_once_and_refuses_two_different_normalisations(rgb):
    model, x, _ = rgb
    with normalized_inputs(model, (MEAN, STD)), normalized_inputs(model, (MEAN, STD)):
        assert len(model._forward_pre_hooks) == 1
        with pytest.raises(ConfigError, match="another mean/std"), normalized_inputs(model, ((0.5,), (0.5,))):
            pass
    assert len(model._forward_pre_hooks) == 0
    with normalized_inputs(model, (MEAN, STD)):
        inside = model(x)
    assert torch.equal(inside, model(normalize(x, (MEAN, STD))))
