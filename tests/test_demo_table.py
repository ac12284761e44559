"""The demo's base-to-new table can tell methods apart on the committed demo-clip backbone.

No method saturates the new classes, and what an image-trained method learns
depends on the seed (its few-shot subset and data order), so the table's
spread over seeds is not zero. The sweep (``bash scripts/base2new.sh demo``)
is too slow for the suite; these are its runs with shortened schedules on
two seeds, evaluated on the same test split.
"""
import os

import pytest
import torch

from conftest import DEMO_CFG, read_results, recipe, run_train
from datasets.catalog import DEMO

SEEDS = (1, 2)
# The sweep's recipes with schedules cut to a few epochs.
SHORT = {
    "MedPromptCLIP": ["OPTIM.MAX_EPOCH", "20", "OPTIM.WARMUP_EPOCH", "1"],
    "CoOp": ["OPTIM.MAX_EPOCH", "10", "DATASET.NUM_SHOTS", "16"],
    "MaPLe": ["OPTIM.MAX_EPOCH", "2", "DATASET.NUM_SHOTS", "16"],
}
IMAGE_TRAINED = ("CoOp", "MaPLe")


def common(root, trainer, recipe_name, out, seed):
    return ["--root", root, "--trainer", trainer, "--dataset-config-file", DEMO_CFG,
            "--config-file", recipe(trainer, recipe_name), "--output-dir", out, "--seed", str(seed)]


@pytest.fixture(scope="module")
def table(tmp_path_factory, demo_root):
    """{method: {seed: (base results, new results, base run folder)}} of short base-to-new runs."""
    root = tmp_path_factory.mktemp("demo_table")
    runs = {}
    for method, opts in SHORT.items():
        for seed in SEEDS:
            base, new = str(root / method / str(seed) / "base"), str(root / method / str(seed) / "new")
            code, _ = run_train(*common(demo_root, method, "base2new", base, seed), "MODEL.BACKBONE.NAME", "demo-clip",
                                *opts, "DATASET.SUBSAMPLE_CLASSES", "base")
            assert code == 0, f"{method} seed {seed}: see {base}/log.txt"
            code, _ = run_train(*common(demo_root, method, "base2new", new, seed), "--eval-only", "--model-dir", base,
                                "MODEL.BACKBONE.NAME", "demo-clip", "DATASET.SUBSAMPLE_CLASSES", "new")
            assert code == 0, f"{method} seed {seed} new: see {new}/log.txt"
            runs.setdefault(method, {})[seed] = (read_results(base), read_results(new), base)
    zs = str(root / "ZeroShotCLIP")
    code, _ = run_train(*common(demo_root, "ZeroShotCLIP", "template", zs, 1), "--eval-only",
                        "MODEL.BACKBONE.NAME", "demo-clip", "DATASET.SUBSAMPLE_CLASSES", "new")
    assert code == 0
    runs["ZeroShotCLIP"] = {1: (None, read_results(zs), None)}
    return runs


def test_no_method_saturates_the_new_classes(table):
    chance = 100.0 / (DEMO.num_classes // 2)
    for method, seeds in table.items():
        for seed, (_, new, _) in seeds.items():
            assert new["classnames"] == list(DEMO.classnames[DEMO.num_classes // 2:])
            assert chance < new["accuracy"] < 100.0, (method, seed, new["accuracy"])


def test_image_trained_methods_differ_between_seeds(table):
    for method in IMAGE_TRAINED:
        base = {seed: results for seed, (results, _, _) in table[method].items()}
        assert len({round(r["accuracy"], 6) for r in base.values()}) == len(SEEDS), (method, base)


def test_random_context_init_depends_on_the_seed(table):
    # MedPromptCLIP's base2new recipe starts its context from random vectors (CTX_INIT "").
    states = []
    for seed in SEEDS:
        folder = table["MedPromptCLIP"][seed][2]
        (path,) = [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if ".pth.tar-" in f]
        states.append(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
    assert states[0].keys() == states[1].keys()
    assert not all(torch.equal(states[0][k], states[1][k]) for k in states[0])
