"""The ``loss`` estimate of the lipschitz score: the measured robust-loss increase per (layer, candidate)."""

import pytest
import torch
from torch.nn import functional as F

from aq_brevitas import LayerSpec, LayerwisePolicy, quantize
from aq_brevitas.errors import ConfigError
from aq_brevitas.models import load_float_model
from aq_brevitas.search import SearchConfig, adversarial_calibration, lipschitz_terms
from aq_brevitas.search.candidates import candidate_table

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(fmnist_val_512):
    model = load_float_model("cnn-pgd")[0].eval()
    x, y = fmnist_val_512
    calib = adversarial_calibration(model, (x[:64], y[:64]), eps=0.1, steps=3, seed=0)
    specs = [LayerSpec(2, "max", "per_channel"), LayerSpec(4, "max", "per_channel", act_bit_width=2)]
    table = candidate_table(model, calib.x_adv, specs, seed=0)
    return model, calib, table, specs


def test_loss_terms_are_the_cross_entropy_increase_of_the_layer_quantized_alone(setup):
    model, calib, table, specs = setup
    terms = lipschitz_terms(model, table, calib, eps=0.1, estimate="loss")
    assert terms.estimate == "loss"
    assert all(v == 0.0 for layer in terms.adversarial.values() for v in layer.values())
    base = F.cross_entropy(model(calib.x_adv), calib.y)
    for spec in specs:  # weight-only, and weight + input activation quantizer
        alone = LayerwisePolicy({"fc1": spec, **{n: None for n in ("conv1", "conv2", "fc2")}})
        q = quantize(model, alone, calibration_data=calib.x).eval()
        with torch.no_grad():
            measured = float(F.cross_entropy(q(calib.x_adv), calib.y) - base)
        assert terms.quantization["fc1"][spec] == pytest.approx(measured, abs=2e-3), spec.short()
    # fc1 at 2 bits loses more robust loss than fc2 at 2 bits on this net (fc1 holds 95 % of the weights)
    assert terms.quantization["fc1"][specs[0]] > terms.quantization["fc2"][specs[0]]


def test_the_estimate_is_a_checked_setting():
    assert SearchConfig().replace(estimate="loss").settings["lipschitz"].estimate == "loss"
    with pytest.raises(ConfigError, match="unknown estimate 'robust'"):
        SearchConfig().replace(estimate="robust")
