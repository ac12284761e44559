"""The feature-based trainers end to end: features of augmented views from the cache, a second run encodes
no image, views keyed by augmentation and count, checkpoints round-trip, unseen classes are refused."""
import os

import pytest
import torch

from conftest import DEMO_CFG, read_results, recipe, run_train
from clipkit import feature_methods as fm

# Short schedules and grids so that each run takes seconds on the CPU.
FAST = {
    "CLIP-Adapter": ["OPTIM.MAX_EPOCH", "2"],
    "Tip-Adapter": ["TRAINER.TIPADAPTER.SEARCH_STEP", "[20, 20]"],
    "Tip-Adapter-F": ["OPTIM.MAX_EPOCH", "2", "TRAINER.TIPADAPTERF.SEARCH_STEP", "[20, 20]"],
    "LP": ["TRAINER.LP.C_GRID", "[1.0,0.01]", "TRAINER.LP.SEARCH_STEPS", "1"],
    "LP++": ["TRAINER.LPPP.ITERATIONS", "20"],
}


def run(name, root, out, cache, *extra, capsys=None, eval_only=False, seed=1):
    args = ["--root", root, "--seed", seed, "--trainer", name, "--dataset-config-file", DEMO_CFG,
            "--config-file", recipe(name, "demo"), "--output-dir", out, "--feature-cache", cache]
    if eval_only:
        args += ["--eval-only", "--model-dir", eval_only]
    code, err = run_train(*args, "MODEL.BACKBONE.NAME", "tiny-clip", "DATASET.NUM_SHOTS", "2", *FAST[name], *extra,
                          capsys=capsys)
    return code, err


@pytest.mark.parametrize("name", sorted(FAST))
def test_second_run_encodes_no_image_and_gives_the_same_result(name, demo_root, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    code, err = run(name, demo_root, first, cache, capsys=capsys)
    assert code == 0, err
    one = read_results(first)
    views = one["feature_cache"]["train_views"]["views"]
    assert one["images_encoded"] == one["num_samples"] + 24 * views + 24  # 12 classes x 2 shots; val 12 x 2
    code, err = run(name, demo_root, second, cache, capsys=capsys)
    assert code == 0, err
    two = read_results(second)
    assert two["images_encoded"] == 0 and two["images_from_feature_cache"] == one["images_encoded"]
    assert two["feature_cache"]["train_views"] == {"images": "hit", "views": views, "encoded": 0,
                                                   "from_cache": 24 * views}
    assert (two["accuracy"], two["macro_f1"]) == (one["accuracy"], one["macro_f1"])
    with open(os.path.join(second, "log.txt")) as f:
        assert "images encoded this run: 0; from the feature cache: " in f.read()

    # The saved model alone reproduces the test accuracy.
    code, err = run(name, demo_root, str(tmp_path / "eval"), cache, capsys=capsys, eval_only=first)
    assert code == 0, err
    assert read_results(str(tmp_path / "eval"))["accuracy"] == one["accuracy"]


def test_views_are_keyed_by_augmentation_and_count_and_equal_without_the_cache(demo_root, tmp_path, capsys):
    cache = str(tmp_path / "cache")

    def train_views(out, *extra, seed=1):
        code, err = run("Tip-Adapter", demo_root, str(tmp_path / out), cache, *extra, capsys=capsys, seed=seed)
        assert code == 0, err
        return read_results(str(tmp_path / out))

    base = train_views("base")
    assert base["feature_cache"]["train_views"]["images"] == "miss"
    train_views("seed2", seed=2)  # another sample of the same split: its rows join the same entry
    for out, extra in (("views2", ["TRAINER.TIPADAPTER.AUGMENT_VIEWS", "2"]), ("scale", ["INPUT.RRCROP_SCALE", "(0.3, 1.0)"])):
        info = train_views(out, *extra)["feature_cache"]["train_views"]
        assert info["images"] == "miss", out
    # Without any cache the views are drawn the same way: the same features, the same result.
    assert train_views("nocache", "TEST.FEATURE_CACHE", "''")["accuracy"] == base["accuracy"]
    files = [f for f in os.listdir(os.path.join(cache, "images")) if f.endswith(".safetensors")]
    assert sorted(f.split("-")[1] for f in files) == ["test", "train", "train", "train", "val"]


def test_views_differ_from_each_other_and_repeat_per_image(demo_root, tmp_path):
    import train
    from core.engine import TRAINER_REGISTRY

    args = train.build_parser().parse_args([
        "--root", demo_root, "--trainer", "CLIP-Adapter", "--dataset-config-file", DEMO_CFG,
        "--config-file", recipe("CLIP-Adapter", "demo"), "--output-dir", str(tmp_path / "o"), "--seed", "1",
        "--feature-cache", "", "MODEL.BACKBONE.NAME", "tiny-clip", "DATASET.NUM_SHOTS", "1", "OPTIM.MAX_EPOCH", "3",
        "DEVICE", "cpu"])
    trainer = TRAINER_REGISTRY.get("CLIP-Adapter")(train.setup_cfg(args))
    views, labels = trainer.train_view_features()
    assert views.shape[:2] == (3, 12) and len(labels) == 12
    assert not torch.allclose(views[0], views[1])  # each epoch sees another augmentation
    again, _ = trainer.train_view_features()
    assert torch.equal(again, views)
    norms = views.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


@pytest.mark.parametrize("name", ["Tip-Adapter", "LP"])
def test_unseen_classes_are_refused_in_one_line(name, demo_root, tmp_path, capsys):
    code, err = run(name, demo_root, str(tmp_path / "new"), str(tmp_path / "c"), "DATASET.SUBSAMPLE_CLASSES", "new",
                    capsys=capsys)
    assert code == 2 and "cannot classify unseen" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "new" / "results.json")


def test_tip_adapter_search_beats_or_matches_its_initial_values(demo_root, tmp_path, capsys):
    code, err = run("Tip-Adapter", demo_root, str(tmp_path / "t"), str(tmp_path / "c"), capsys=capsys)
    assert code == 0, err
    search = read_results(str(tmp_path / "t"))["search"]
    assert search["val_accuracy"] >= search["val_accuracy_initial"]
    grid = fm.search_grid(50, 20)
    assert min(abs(search["beta"] - g) for g in grid) < 1e-9 and min(abs(search["alpha"] - g) for g in grid) < 1e-9


def test_the_five_are_registered_as_feature_based_few_shot_methods():
    from core.engine import TRAINER_REGISTRY
    from conftest import PROJECT_DIR

    for name in FAST:
        cls = TRAINER_REGISTRY.get(name)
        assert cls.KIND == "feature-based" and set(cls.RECIPES) == {"fewshot"}
        for recipe_name in ("fewshot", "demo"):
            assert os.path.isfile(os.path.join(PROJECT_DIR, "configs", "trainers", name, f"{recipe_name}.yaml"))


def sweep_env(monkeypatch, demo_root, output, opts):
    monkeypatch.setenv("METHODS", " ".join(sorted(FAST)))
    monkeypatch.setenv("SEEDS", "1")
    monkeypatch.setenv("SHOTS", "1")
    monkeypatch.setenv("BACKBONE", "tiny-clip")
    monkeypatch.setenv("DATA", demo_root)
    monkeypatch.setenv("OUTPUT", output)
    monkeypatch.setenv("OPTS", " ".join(opts + ["DEVICE", "cpu"]))


def test_fewshot_sweep_shows_the_five_and_a_second_sweep_encodes_no_image(demo_root, tmp_path, monkeypatch, capsys):
    import sys

    from conftest import PROJECT_DIR

    sys.path.insert(0, os.path.join(PROJECT_DIR, "scripts"))
    import sweep

    opts = ["OPTIM.MAX_EPOCH", "2", "TRAINER.TIPADAPTER.SEARCH_STEP", "[20,20]", "TRAINER.TIPADAPTERF.SEARCH_STEP",
            "[20,20]", "TRAINER.LP.C_GRID", "[1.0,0.01]", "TRAINER.LP.SEARCH_STEPS", "1", "TRAINER.LPPP.ITERATIONS", "20"]
    first = str(tmp_path / "first")
    sweep_env(monkeypatch, demo_root, first, opts)
    assert sweep.main(["fewshot", "demo"]) == 0
    table = capsys.readouterr().out
    for name in FAST:
        assert f"\n{name} " in table, name

    second = str(tmp_path / "second")
    sweep_env(monkeypatch, demo_root, second, opts + ["TEST.FEATURE_CACHE", os.path.join(first, "feature_cache")])
    assert sweep.main(["fewshot", "demo"]) == 0
    assert capsys.readouterr().out.count("done ") == len(FAST)  # run again in the new folder, not reused
    found = 0
    for folder, _, files in os.walk(second):
        if "results.json" in files:
            found += 1
            assert read_results(folder)["images_encoded"] == 0, folder
            with open(os.path.join(folder, "log.txt")) as f:
                assert "images encoded this run: 0;" in f.read()
    assert found == len(FAST) and not os.path.exists(os.path.join(second, "feature_cache"))

    # A base-to-new sweep refuses them in one line.
    assert sweep.main(["base2new", "demo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no base2new recipe" in err[0]
