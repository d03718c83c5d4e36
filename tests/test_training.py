import pytest
import torch

from aq_brevitas.evaluate.accuracy import attack_accuracy
from aq_brevitas.models import build_model
from aq_brevitas.train.training import adversarial_train


def test_one_epoch_pgd_training_raises_pgd_accuracy(fmnist_val_512, fmnist_test_1k):
    torch.manual_seed(0)
    model = build_model("small_cnn")
    x_eval, y_eval = fmnist_test_1k[0][:500], fmnist_test_1k[1][:500]
    before = attack_accuracy(model, x_eval, y_eval, "pgd", eps=0.1, steps=10)
    history = adversarial_train(
        model,
        fmnist_val_512,
        eps=0.1,
        steps=5,
        epochs=1,
        lr=2e-3,
        optimizer="adam",
        batch_size=32,
        progress=False,
    )
    after = attack_accuracy(model, x_eval, y_eval, "pgd", eps=0.1, steps=10)
    assert history.epochs[0].adv_acc is not None
    assert after > before + 0.05, (before, after)


def test_resume_replays_the_uninterrupted_run(tmp_path, fmnist_val_512, monkeypatch):
    import aq_brevitas.train.training as training

    data = (fmnist_val_512[0][:128], fmnist_val_512[1][:128])
    kwargs = dict(
        eps=0.1, steps=2, lr=2e-3, optimizer="adam", batch_size=32, progress=False, seed=1, epochs=3
    )

    torch.manual_seed(0)
    full = build_model("small_cnn")
    adversarial_train(full, data, **kwargs)

    # Crash right after the epoch-1 checkpoint is written.
    real_save = training.save_checkpoint

    def save_then_die(*args, **kw):
        real_save(*args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    torch.manual_seed(0)
    ckpt = tmp_path / "state.pt"
    try:
        adversarial_train(build_model("small_cnn"), data, checkpoint=ckpt, **kwargs)
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1

    torch.manual_seed(123)  # a different init: resume must overwrite it from the checkpoint
    resumed = build_model("small_cnn")
    hist = adversarial_train(resumed, data, checkpoint=ckpt, resume=True, **kwargs)
    assert hist.resumed_from_epoch == 1 and [e.epoch for e in hist.epochs] == [1, 2, 3]
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        # the same operations on the same data and RNG states, in one process: bit for bit equal
        assert torch.equal(a, b), "resumed run diverged from the uninterrupted one"


def test_plain_training_lowers_loss(fmnist_val_512):
    torch.manual_seed(0)
    model = build_model("vgg_bn")
    h = adversarial_train(
        model, fmnist_val_512, eps=0.0, epochs=2, lr=2e-3, optimizer="adam", batch_size=64, progress=False
    )
    assert h.epochs[1].loss < h.epochs[0].loss
    assert h.epochs[0].adv_acc is None and h.epochs[0].clean_acc is not None


def test_trades_and_clean_mixing_train(fmnist_val_512):
    data = (fmnist_val_512[0][:256], fmnist_val_512[1][:256])
    for kwargs in ({"trades_beta": 6.0}, {"clean_weight": 0.5}):
        torch.manual_seed(0)
        model = build_model("small_cnn")
        h = adversarial_train(
            model,
            data,
            eps=0.1,
            steps=2,
            epochs=3,
            lr=2e-3,
            optimizer="adam",
            batch_size=32,
            progress=False,
            **kwargs,
        )
        assert h.epochs[-1].loss < h.epochs[0].loss, kwargs
        assert h.epochs[0].clean_acc is not None and h.epochs[0].adv_acc is not None


def test_alpha_and_random_start_reach_the_attack(fmnist_val_512, monkeypatch):
    """`alpha` and `random_start` are what the PGD inner maximisation is built with."""
    import aq_brevitas.train.training as training

    seen = {}
    real = training.make_attack

    def spy(name, model, **kw):
        seen.update(kw)
        return real(name, model, **kw)

    monkeypatch.setattr(training, "make_attack", spy)
    data = (fmnist_val_512[0][:64], fmnist_val_512[1][:64])
    torch.manual_seed(0)
    model = build_model("small_cnn")
    h = adversarial_train(
        model, data, eps=0.1, steps=2, alpha=0.03, random_start=False, lr=1e-3, batch_size=32, progress=False
    )
    assert seen["alpha"] == 0.03 and seen["random_start"] is False and seen["steps"] == 2
    # Madry mode also reports clean accuracy (from one no-grad eval forward per step).
    assert h.epochs[0].clean_acc is not None and 0 <= h.epochs[0].clean_acc <= 1

    # Without a random start the attack draws no noise: another seed (which only reseeds the shuffle
    # and the attack noise) with the same batch order gives the same weights, unlike with a random start.
    def run(seed: int, random_start: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        m = build_model("small_cnn")
        adversarial_train(
            m, data, eps=0.1, steps=2, alpha=0.03, random_start=random_start, lr=1e-3, batch_size=64,
            progress=False, seed=seed,
        )  # fmt: skip
        return list(m.state_dict().values())

    def gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))

    fixed, noisy = gap(run(0, False), run(1, False)), gap(run(0, True), run(1, True))
    # measured 9e-10 (float summation order of the shuffled batch) vs 7e-6 after one step at lr=1e-3
    assert fixed < 1e-7 < noisy, (fixed, noisy)


def test_bad_alpha_is_refused(fmnist_val_512):
    from aq_brevitas.errors import ConfigError

    with pytest.raises(ConfigError, match="alpha"):
        adversarial_train(build_model("small_cnn"), fmnist_val_512, alpha=-0.1, progress=False)


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
    got = make_attack("tpgd", model, eps=0.1, steps=5, alpha=0.05)(x, y)
    assert model.training  # restored after the attack
    # The same operations in the same order on the same tensors, in one process: bit for bit equal.
    assert torch.equal(got, expect)
    assert (got - x).abs().max() <= 0.1 + 1e-6 and not torch.equal(got, x)


def test_config_and_keywords_are_one_thing(fmnist_val_512):
    """adversarial_train(config=TrainConfig(...)) and the keyword spelling train identically."""
    from aq_brevitas.config import TrainConfig

    data = (fmnist_val_512[0][:64], fmnist_val_512[1][:64])
    settings = dict(eps=0.1, steps=1, lr=1e-3, optimizer="adam", batch_size=32, progress=False)
    torch.manual_seed(0)
    a = build_model("small_cnn")
    adversarial_train(a, data, **settings)
    torch.manual_seed(0)
    b = build_model("small_cnn")
    cfg = TrainConfig(eps=0.1, steps=3, lr=1e-3, optimizer="adam", batch_size=32)
    adversarial_train(b, data, cfg, steps=1, progress=False)  # a keyword overrides the config
    for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    from aq_brevitas.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown TrainConfig setting\(s\) 'freeze_quant_weights'"):
        adversarial_train(b, data, freeze_quant_weights=False, progress=False)
