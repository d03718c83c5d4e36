"""The shared torch utilities: one data convention (as_xy / iter_x_batches / as_dataset), the image
check, fx leaf tracing and BatchNorm folding."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from aq_brevitas.errors import ConfigError
from aq_brevitas.folding import fold_batchnorm
from aq_brevitas.forward import as_dataset, as_xy, check_images, iter_x_batches, predicted_labels
from aq_brevitas.models import build_model
from aq_brevitas.nnutils import trace_leaves

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def xy():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(70, 1, 28, 28, generator=gen), torch.randint(0, 10, (70,), generator=gen)


class _MapStyle(Dataset):
    """A plain map-style Dataset (not a TensorDataset) yielding (image, label)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def _forms(x, y):
    """Every accepted form of the same 70 images and labels."""
    return {
        "pair": (x, y),
        "list pair": [x, y],
        "TensorDataset": TensorDataset(x, y),
        "map-style Dataset": _MapStyle(x, y),
        "DataLoader": DataLoader(TensorDataset(x, y), batch_size=16),
        "list of batches": [(x[i : i + 32], y[i : i + 32]) for i in range(0, 70, 32)],
        "generator of batches": ((x[i : i + 20], y[i : i + 20]) for i in range(0, 70, 20)),
    }


@pytest.mark.parametrize("form", sorted(_forms(torch.zeros(1), torch.zeros(1))))
def test_every_form_gives_the_same_tensors(xy, form):
    x, y = xy
    gx, gy = as_xy(_forms(x, y)[form])
    assert torch.equal(gx, x) and torch.equal(gy, y) and gy.dtype == torch.int64
    lx, ly = as_xy(_forms(x, y)[form], limit=33)
    assert torch.equal(lx, x[:33]) and torch.equal(ly, y[:33])
    assert torch.equal(torch.cat(list(iter_x_batches(_forms(x, y)[form]))), x)
    ds = as_dataset(_forms(x, y)[form])
    assert len(ds) == 70 and torch.equal(ds[5][0], x[5]) and int(ds[5][1]) == int(y[5])


def test_images_without_labels_take_the_models_predictions(xy):
    x, _ = xy
    model = build_model("small_cnn").train()
    expect = predicted_labels(model, x)
    assert model.training  # predictions ran in eval mode and restored the flag
    for data in (x, DataLoader(x, batch_size=16), [x[:40], x[40:]]):
        gx, gy = as_xy(data, model=model)
        assert torch.equal(gx, x) and torch.equal(gy, expect)
    with pytest.raises(ConfigError, match="calibration data has no labels"):
        as_xy(x, name="calibration data")


def test_streaming_keeps_loader_batches_and_splits_tensors(xy):
    x, y = xy
    assert [len(b) for b in iter_x_batches(x, batch_size=32)] == [32, 32, 6]
    assert [len(b) for b in iter_x_batches(DataLoader(TensorDataset(x, y), batch_size=50))] == [50, 20]
    assert [len(b) for b in iter_x_batches((x, y), batch_size=64, limit_batches=1)] == [64]
    assert [len(b) for b in iter_x_batches([x[:10], x[10:30]])] == [10, 20]  # two image batches, not a pair


def test_dataloader_gives_its_dataset_for_training(xy):
    loader = DataLoader(TensorDataset(*xy), batch_size=8, shuffle=True)
    assert len(as_dataset(loader)) == 70  # the whole dataset: sampling is the training loop's
    plain = _MapStyle(*xy)
    assert as_dataset(DataLoader(plain, batch_size=8)) is plain


@pytest.mark.parametrize(
    "data, message",
    [
        ([1, 2, 3], r"inputs: batch 0 is an int, not \(images, labels\)"),
        ("images.npz", r"inputs of type str is not supported"),
        ({"x": 1}, r"inputs of type dict is not supported"),
        (42, r"inputs of type int is not supported"),
        ([], r"inputs is empty"),
        (DataLoader(TensorDataset(torch.rand(0, 1, 4, 4)), batch_size=4), r"inputs is empty"),
        ((torch.rand(4, 1, 4, 4), torch.zeros(3, dtype=torch.long)), r"4 images but 3 labels"),
        ((torch.rand(4, 1, 4, 4), torch.zeros(4)), r"labels have dtype torch\.float32"),
        (
            (torch.zeros(4, 1, 4, 4, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)),
            r"inputs have dtype",
        ),
        ((2 * torch.rand(4, 1, 4, 4) + 0.1, torch.zeros(4, dtype=torch.long)), r"outside \[0, 1\]"),
        ((torch.full((4, 1, 4, 4), float("nan")), torch.zeros(4, dtype=torch.long)), r"NaN or Inf"),
        (
            [(torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)), torch.rand(2, 1, 4, 4)],
            r"mixes batches",
        ),
        ([(torch.rand(2, 1, 4, 4),), (torch.rand(2, 1, 5, 5),)], r"batches cannot be joined"),
    ],
)
def test_bad_data_is_refused_in_one_line(data, message):
    with pytest.raises(ConfigError, match=message) as err:
        as_xy(data, name="inputs")
    assert "\n" not in str(err.value) and "-- fix:" in str(err.value)


def test_limit_must_be_positive(xy):
    with pytest.raises(ConfigError, match="limit must be positive, got 0"):
        as_xy(xy, limit=0)


def test_image_check_options():
    check_images(torch.randn(2, 3), "x", unit_range=False)  # normalised values are fine without unit_range
    check_images(torch.rand(5), "x", batch=False)
    with pytest.raises(ConfigError, match=r"x of shape \(5,\) has no batch dimension"):
        check_images(torch.rand(5), "x")
    with pytest.raises(ConfigError, match=r"x is a list, expected a floating-point tensor"):
        check_images([[0.0]], "x", unit_range=False)


def test_trace_leaves_keeps_layers_whole_and_gives_up_quietly():
    gm = trace_leaves(build_model("vgg_bn"))
    assert gm is not None and any(n.op == "call_module" and n.target == "block1.bn" for n in gm.graph.nodes)

    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    assert trace_leaves(DataDependent()) is None


def test_fold_batchnorm_keeps_the_function():
    torch.manual_seed(0)
    model = build_model("vgg_bn").eval()
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(4, 1, 28, 28)
    before = model(x)
    pairs = fold_batchnorm(model)
    assert pairs and all(isinstance(model.get_submodule(bn), nn.Identity) for bn in pairs.values())
    assert torch.allclose(model(x), before, atol=1e-5)
