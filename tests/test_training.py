import pytest
import torch

from aq_brevitas.config import AttackConfig, TrainConfig
from aq_brevitas.evaluate.accuracy import attack_accuracy
from aq_brevitas.models import build_model
from aq_brevitas.train.training import adversarial_train

PGD10 = AttackConfig("pgd", eps=0.1, steps=10)


def test_one_epoch_pgd_training_raises_pgd_accuracy(fmnist_val_512, fmnist_test_1k):
    torch.manual_seed(0)
    model = build_model("small_cnn")
    x_eval, y_eval = fmnist_test_1k[0][:500], fmnist_test_1k[1][:500]
    before = attack_accuracy(model, x_eval, y_eval, PGD10)
    cfg = TrainConfig(eps=0.1, steps=5, epochs=1, lr=2e-3, optimizer="adam", batch_size=32)
    history = adversarial_train(model, fmnist_val_512, cfg, progress=False)
    after = attack_accuracy(model, x_eval, y_eval, PGD10)
    assert history.epochs[0].adv_acc is not None
    assert after > before + 0.05, (before, after)


def test_resume_replays_the_uninterrupted_run(tmp_path, fmnist_val_512, monkeypatch):
    import aq_brevitas.train.training as training

    data = (fmnist_val_512[0][:128], fmnist_val_512[1][:128])
    cfg = TrainConfig(eps=0.1, steps=2, lr=2e-3, optimizer="adam", batch_size=32, seed=1, epochs=3)

    torch.manual_seed(0)
    full = build_model("small_cnn")
    adversarial_train(full, data, cfg, progress=False)

    # Crash right after the epoch-1 checkpoint is written.
    real_save = training.save_checkpoint

    def save_then_die(*args, **kw):
        real_save(*args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    torch.manual_seed(0)
    ckpt = tmp_path / "state.pt"
    try:
        adversarial_train(build_model("small_cnn"), data, cfg, checkpoint=ckpt, progress=False)
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1

    torch.manual_seed(123)  # a different init: resume must overwrite it from the checkpoint
    resumed = build_model("small_cnn")
    hist = adversarial_train(resumed, data, cfg, checkpoint=ckpt, resume=True, progress=False)
    assert hist.resumed_from_epoch == 1 and [e.epoch for e in hist.epochs] == [1, 2, 3]
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        # the same operations on the same data and RNG states, in one process: bit for bit equal
        assert torch.equal(a, b), "resumed run diverged from the uninterrupted one"


def test_plain_training_lowers_loss(fmnist_val_512):
    torch.manual_seed(0)
    model = build_model("vgg_bn")
    cfg = TrainConfig(eps=0.0, epochs=2, lr=2e-3, optimizer="adam", batch_size=64)
    h = adversarial_train(model, fmnist_val_512, cfg, progress=False)
    assert h.epochs[1].loss < h.epochs[0].loss
    assert h.epochs[0].adv_acc is None and h.epochs[0].clean_acc is not None


def test_trades_and_clean_mixing_train(fmnist_val_512):
    data = (fmnist_val_512[0][:256], fmnist_val_512[1][:256])
    base = TrainConfig(eps=0.1, steps=2, epochs=3, lr=2e-3, optimizer="adam", batch_size=32)
    for cfg in (base.replace(trades_beta=6.0), base.replace(clean_weight=0.5)):
        torch.manual_seed(0)
        model = build_model("small_cnn")
        h = adversarial_train(model, data, cfg, progress=False)
        assert h.epochs[-1].loss < h.epochs[0].loss, cfg
        assert h.epochs[0].clean_acc is not None and h.epochs[0].adv_acc is not None


def test_alpha_and_random_start_reach_the_attack(fmnist_val_512, monkeypatch):
    """`alpha` and `random_start` are what the PGD inner maximisation is built with."""
    import aq_brevitas.train.training as training

    seen = {}
    real = training.make_attack

    def spy(config, model, **kw):
        seen["config"] = config
        return real(config, model, **kw)

    monkeypatch.setattr(training, "make_attack", spy)
    data = (fmnist_val_512[0][:64], fmnist_val_512[1][:64])
    torch.manual_seed(0)
    model = build_model("small_cnn")
    cfg = TrainConfig(eps=0.1, steps=2, alpha=0.03, random_start=False, lr=1e-3, batch_size=32)
    h = adversarial_train(model, data, cfg, progress=False)
    atk = seen["config"]
    assert atk.alpha == 0.03 and atk.random_start is False and atk.steps == 2 and atk.name == "pgd"
    # Madry mode also reports clean accuracy (from one no-grad eval forward per step).
    assert h.epochs[0].clean_acc is not None and 0 <= h.epochs[0].clean_acc <= 1

    # Without a random start the attack draws no noise: another seed (which only reseeds the shuffle
    # and the attack noise) with the same batch order gives the same weights, unlike with a random start.
    def run(seed: int, random_start: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        m = build_model("small_cnn")
        cfg = TrainConfig(eps=0.1, steps=2, alpha=0.03, random_start=random_start, lr=1e-3, batch_size=64)
        adversarial_train(m, data, cfg.replace(seed=seed), progress=False)
        return list(m.state_dict().values())

    def gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))

    fixed, noisy = gap(run(0, False), run(1, False)), gap(run(0, True), run(1, True))
    # measured 9e-10 (float summation order of the shuffled batch) vs 7e-6 after one step at lr=1e-3
    assert fixed < 1e-7 < noisy, (fixed, noisy)


def test_bad_alpha_is_refused(fmnist_val_512):
    from aq_brevitas.errors import ConfigError

    with pytest.raises(ConfigError, match="alpha"):
        adversarial_train(build_model("small_cnn"), fmnist_val_512, TrainConfig(alpha=-0.1), progress=False)


def test_cli_train_writes_sidecar_and_resumes(tmp_path):
    """`aq-brevitas train` end to end on 128 images: checkpoint, sidecar fields, then --resume adds an epoch."""
    import json

    from aq_brevitas.models import load_float_model
    from conftest import run_cli

    out = tmp_path / "m.pt"
    common = ["train", "--arch", "small_cnn", "--out", str(out)]
    common += ["--train-images", "128", "--train-steps", "1"]
    common += ["--batch-size", "64", "--optimizer", "adam", "--lr", "2e-3", "--alpha", "0.05"]
    common += ["--no-random-start", "--test-images", "50", "--pgd-steps", "2"]
    res = run_cli(*common, "--epochs", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    printed = json.loads(res.stdout.strip().splitlines()[-1])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["arch"] == "small_cnn" and meta["eps"] == 0.1 and meta["attack_steps"] == 1
    assert meta["alpha"] == 0.05 and meta["random_start"] is False and meta["test_images"] == 50
    assert meta["train_split"] == "train[limit=128, seed=0]"
    assert printed["clean_acc"] == meta["clean_acc"] and 0 <= meta["clean_acc"] <= 1
    assert 0 <= meta["pgd_acc"] <= 1
    (e1,) = meta["history"]["epochs"]
    assert (
        e1["epoch"] == 1 and e1["images"] == 128 and e1["adv_acc"] is not None and e1["clean_acc"] is not None
    )
    model, loaded_meta = load_float_model(str(out))
    assert loaded_meta["clean_acc"] == meta["clean_acc"] and sum(p.numel() for p in model.parameters()) > 0

    res = run_cli(*common, "--epochs", "2", "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    meta2 = json.loads(out.with_suffix(".json").read_text())
    assert meta2["history"]["resumed_from_epoch"] == 1
    assert [e["epoch"] for e in meta2["history"]["epochs"]] == [1, 2]
    assert meta2["history"]["epochs"][0] == e1  # the finished epoch came from the checkpoint


def test_trades_adversary_is_torchattacks_tpgd(fmnist_val_512):
    """TRADES's inner maximisation is torchattacks TPGD through make_attack, with the semantics the
    loop had when it was written by hand: KL(f(x') ‖ f(x)) summed, start x + 0.001·N(0, 1) clamped to
    [0, 1], ``steps`` signed steps of ``alpha`` projected on the ε-ball and [0, 1], eval mode inside."""
    from torch.nn import functional as F

    from aq_brevitas.attacks import make_attack

    def reference(model, x, eps, steps, alpha):
        model.eval()
        with torch.no_grad():
            p_clean = F.softmax(model(x), 1)
        x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1).detach()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            kl = F.kl_div(F.log_softmax(model(x_adv), 1), p_clean, reduction="sum")
            (grad,) = torch.autograd.grad(kl, x_adv)
            x_adv = x_adv.detach() + alpha * grad.sign()  # the projection written as torchattacks writes it
            x_adv = (x + (x_adv - x).clamp(-eps, eps)).clamp(0, 1)
        model.train()
        return x_adv.detach()

    torch.manual_seed(0)
    model = build_model("small_cnn").train()
    x, y = fmnist_val_512[0][:64], fmnist_val_512[1][:64]
    torch.manual_seed(1)
    expect = reference(model, x, 0.1, 5, 0.05)
    torch.manual_seed(1)
    got = make_attack(AttackConfig("tpgd", eps=0.1, steps=5, alpha=0.05), model)(x, y)
    assert model.training  # restored after the attack
    # The same operations in the same order on the same tensors, in one process: bit for bit equal.
    assert torch.equal(got, expect)
    assert (got - x).abs().max() <= 0.1 + 1e-6 and not torch.equal(got, x)


def test_settings_come_only_from_the_config(fmnist_val_512):
    """A TrainConfig field given as a keyword (the old separate normalization= included) is a one-line
    error naming the config to put it in; a config of another kind is refused in one line."""
    from aq_brevitas.errors import ConfigError

    data = (fmnist_val_512[0][:64], fmnist_val_512[1][:64])
    model = build_model("small_cnn")
    with pytest.raises(ConfigError, match=r"takes eps in its config.*config=TrainConfig\(eps=\.\.\.\)"):
        adversarial_train(model, data, eps=0.1, progress=False)
    with pytest.raises(ConfigError, match=r"takes normalization in its config"):
        adversarial_train(model, data, TrainConfig(), normalization=((0.5,), (0.5,)), progress=False)
    with pytest.raises(ConfigError, match="config is an AttackConfig, not a TrainConfig"):
        adversarial_train(model, data, AttackConfig(), progress=False)
