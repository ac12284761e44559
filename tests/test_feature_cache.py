"""The persistent feature cache: keyed, shared by runs and halves, validated, safe with concurrent writers."""
import os
import threading

import torch

from conftest import DEMO_CFG, read_results, recipe, run_train
from clipkit.feature_cache import FeatureCache


def zeroshot(root, out, cache, *extra, seed=1, capsys=None):
    code, err = run_train("--root", root, "--seed", seed, "--trainer", "ZeroShotCLIP", "--dataset-config-file", DEMO_CFG,
                          "--config-file", recipe("ZeroShotCLIP", "template"), "--output-dir", out, "--eval-only",
                          "--feature-cache", cache, "MODEL.BACKBONE.NAME", "tiny-clip", *extra, capsys=capsys)
    assert code == 0, err
    return read_results(out)


def image_files(cache):
    folder = os.path.join(cache, "images")
    return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))


def test_each_test_image_is_encoded_once_across_runs_and_halves(tmp_path, demo_root, capsys):
    cache = str(tmp_path / "cache")
    base = zeroshot(demo_root, str(tmp_path / "b1"), cache, "DATASET.SUBSAMPLE_CLASSES", "base", capsys=capsys)
    new = zeroshot(demo_root, str(tmp_path / "n1"), cache, "DATASET.SUBSAMPLE_CLASSES", "new", capsys=capsys)
    assert base["feature_cache"]["test"] == {"images": "miss", "encoded": base["num_samples"], "from_cache": 0}
    assert new["feature_cache"]["test"]["encoded"] == new["num_samples"]  # the new half adds its own images
    assert len(image_files(cache)) == 1
    again = zeroshot(demo_root, str(tmp_path / "all"), cache, capsys=capsys)
    assert again["feature_cache"]["test"] == {"images": "hit", "encoded": 0, "from_cache": base["num_samples"] + new["num_samples"]}
    assert again["feature_cache"]["texts"] == ["miss"]  # other classes, other prompts
    base2 = zeroshot(demo_root, str(tmp_path / "b2"), cache, "DATASET.SUBSAMPLE_CLASSES", "base", seed=2,
                     capsys=capsys)
    assert base2["feature_cache"]["test"]["images"] == "hit" and base2["feature_cache"]["texts"] == ["hit"]
    assert base2["accuracy"] == base["accuracy"] and base2["macro_f1"] == base["macro_f1"]

    # Another preprocessing is another key; a damaged file is ignored, rebuilt, and gives the same result.
    other = zeroshot(demo_root, str(tmp_path / "bilinear"), cache, "INPUT.INTERPOLATION", "bilinear", capsys=capsys)
    assert other["feature_cache"]["test"]["images"] == "miss" and len(image_files(cache)) == 2
    path = os.path.join(cache, "images", image_files(cache)[0])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    for name in ("rebuilt", "rebuilt-bilinear"):
        extra = ["INPUT.INTERPOLATION", "bilinear"] if "bilinear" in name else []
        out = zeroshot(demo_root, str(tmp_path / name), cache, *extra, capsys=capsys)
        assert out["accuracy"] == (other if extra else again)["accuracy"]
    assert {"miss", "hit"} == {read_results(str(tmp_path / n))["feature_cache"]["test"]["images"]
                               for n in ("rebuilt", "rebuilt-bilinear")}


def test_no_cache_when_the_setting_is_empty(tmp_path, demo_root, capsys):
    out = str(tmp_path / "run")
    code, err = run_train("--root", demo_root, "--trainer", "ZeroShotCLIP", "--dataset-config-file", DEMO_CFG,
                          "--config-file", recipe("ZeroShotCLIP", "template"), "--output-dir", out, "--eval-only",
                          "MODEL.BACKBONE.NAME", "tiny-clip", "TEST.FEATURE_CACHE", "''", capsys=capsys)
    assert code == 0, err
    assert "feature_cache" not in read_results(out) and not os.path.exists(os.path.join(out, "feature_cache"))


def test_concurrent_writers_keep_every_row(tmp_path):
    store = FeatureCache(str(tmp_path))
    key = {"dataset": "d", "split": "test", "backbone": "b"}
    names = [f"img{i}.png" for i in range(40)]
    truth = torch.randn(40, 8)
    barrier = threading.Barrier(4)

    def encode_part(part):
        def encode(indices):
            barrier.wait(timeout=30)  # every writer has read the cache before any writes
            return truth[[int(names_part[i][3:-4]) for i in indices]]

        names_part = names[part::4]
        store.image_features(key, names_part, encode)

    threads = [threading.Thread(target=encode_part, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    feats, encoded = store.image_features(key, names, lambda indices: 1 / 0)
    assert encoded == 0 and torch.equal(feats, truth)
    assert not [f for f in os.listdir(os.path.join(str(tmp_path), "images")) if f.endswith(".tmp")]
