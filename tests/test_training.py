import torch

from aq_brevitas.evaluate import attack_accuracy
from aq_brevitas.models import build_model
from aq_brevitas.training import adversarial_train


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
    import aq_brevitas.training as training

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
        assert torch.allclose(a, b, atol=1e-6), "resumed run diverged from the uninterrupted one"


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
