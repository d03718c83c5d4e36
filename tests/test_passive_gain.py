"""Parameter-free ops in the data-free chain gain (issue 24, item 2): pooling and upsampling between
layers scale a perturbation, so gain_spectral includes a bound of each, and names what it cannot bound."""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from aq_brevitas.score.lipschitz import lipschitz_scores
from aq_brevitas.score.passive import module_norm

torch.set_num_threads(1)


@pytest.mark.parametrize(
    "op, shape, exact",
    [
        (nn.AvgPool2d(2), (3, 8, 8), True),
        (nn.AvgPool2d(3, stride=1, padding=1), (2, 7, 7), False),  # overlapping windows, zero padding counted
        (nn.MaxPool2d(3, stride=2), (2, 9, 9), False),  # each input in up to 4 windows
        (nn.MaxPool1d(2), (2, 10), False),
        (nn.AdaptiveAvgPool2d(1), (4, 6, 6), True),
        (nn.AdaptiveAvgPool2d(2), (1, 8, 8), True),
        (nn.Upsample(scale_factor=2), (2, 3, 3), True),
        (nn.Upsample(scale_factor=(1, 3)), (1, 2, 4), True),
    ],
)
def test_each_bound_holds_on_random_pairs_and_is_reached_where_exact(op, shape, exact):
    torch.manual_seed(0)
    x, y = torch.rand(64, *shape), torch.rand(64, *shape)
    norm = module_norm(op, shape, tuple(op(x[:1]).shape[1:]))
    ratio = ((op(x) - op(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)).max().item()
    assert ratio <= norm * (1 + 1e-6)
    ones = torch.ones(1, *shape)  # a constant perturbation: reaches the bound of averages and copies
    if exact:
        assert op(ones).norm().item() / ones.norm().item() == pytest.approx(norm, rel=1e-6)


def test_what_it_cannot_bound_is_none():
    assert module_norm(nn.AvgPool2d(3, padding=1, count_include_pad=False), (1, 6, 6), (1, 6, 6)) is None
    assert module_norm(nn.Upsample(scale_factor=2, mode="bilinear"), (1, 3, 3), (1, 6, 6)) is None
    assert module_norm(nn.AdaptiveAvgPool2d(4), (1, 6, 6), (1, 4, 4)) is None  # unequal windows


def _net(head: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Upsample(scale_factor=2), head, nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip


def test_the_spectral_gain_multiplies_the_ops_between_layers_and_still_bounds_the_jacobian():
    model, x = _net(nn.AdaptiveAvgPool2d(1)), torch.rand(8, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every op here is bounded: no warning
        scores = lipschitz_scores(model, x, gains=("spectral", "jacobian"))
    L = {n: s.L for n, s in scores.items()}
    assert scores["8"].gain_spectral == 1.0
    assert scores["3"].gain_spectral == pytest.approx(math.sqrt(4) * (1 / 8) * L["8"])
    assert scores["0"].gain_spectral == pytest.approx(0.5 * L["3"] * math.sqrt(4) * (1 / 8) * L["8"])
    for s in scores.values():  # the measured gain never exceeds the data-free bound
        assert s.gain_jacobian <= s.gain_spectral * (1 + 1e-3)


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1) * 0.5)


def test_a_functional_scaling_the_hooks_cannot_see_is_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"gain_spectral leaves out adaptive_avg_pool2d .*mul by a constant"):
        lipschitz_scores(_Functional(), torch.rand(4, 1, 6, 6), gains=("spectral",))
