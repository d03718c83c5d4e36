import json
import re

from aq_brevitas.config import AttackConfig
from aq_brevitas.evaluate.accuracy import accuracy, attack_accuracy
from aq_brevitas.models import ZOO_DIR, load_float_model, zoo_names
from conftest import REPO


def test_zoo_ships_six_small_models():
    assert zoo_names() == ["cnn-pgd", "cnn-plain", "resnet-pgd", "tfc-pgd", "vgg-pgd", "vgg-plain"]
    for name in zoo_names():
        assert (ZOO_DIR / f"{name}.pt").stat().st_size < 2 * 1024 * 1024


def test_docs_table_matches_sidecars():
    text = (REPO / "docs" / "zoo.md").read_text()
    for name in zoo_names():
        meta = json.loads((ZOO_DIR / f"{name}.json").read_text())
        row = re.search(rf"\| `{name}` \|.*\| ([\d.]+) \| ([\d.]+) \|", text)
        assert row, name
        assert float(row.group(1)) == round(100 * meta["clean_acc"], 2)
        assert float(row.group(2)) == round(100 * meta["pgd_acc"], 2)
        assert meta["test_images"] == 10000


def test_cnn_pgd_remeasured_on_1k_within_sampling_error(fmnist_test_1k):
    model, meta = load_float_model("cnn-pgd")
    x, y = fmnist_test_1k
    clean = accuracy(model, x, y)
    pgd = attack_accuracy(
        model, x, y, AttackConfig("pgd", meta["pgd_eval"]["eps"], meta["pgd_eval"]["steps"])
    )
    # n = 1000 images drawn at random without replacement from the N = 10000 the sidecar was measured
    # on: the subset's accuracy has the binomial standard error sqrt(p(1 - p)(1/n - 1/N)) around the
    # full set's p (1.1 points for clean p = 0.84, 1.3 for PGD p = 0.74). Within 3 standard errors
    # (two-sided 0.3 %); another CPU's rounding flips at most a few of the 1000 images.
    for got, p in ((clean, meta["clean_acc"]), (pgd, meta["pgd_acc"])):
        se = (p * (1 - p) * (1 / len(y) - 1 / meta["test_images"])) ** 0.5
        assert abs(got - p) <= 3 * se, (got, p, se)
