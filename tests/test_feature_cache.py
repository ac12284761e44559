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


def rewrite(path, features, rows=None, meta=None, fix_checksum=True):
    """Write a cache file with other features (and rows), keeping its key; the checksum recomputed or not."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from clipkit.feature_cache import checksum

    with safe_open(path, framework="pt") as f:
        metadata = dict(f.metadata())
    if rows is not None:
        metadata["rows"] = json.dumps(rows)
    if fix_checksum:
        metadata["checksum"] = checksum(features, json.loads(metadata["rows"]))
    metadata.update(meta or {})
    save_file({"features": features.contiguous()}, path, metadata=metadata)


def test_changed_images_under_the_same_split_are_encoded_again(tmp_path, demo_root, capsys):
    import shutil

    from PIL import Image

    root = tmp_path / "data"
    shutil.copytree(os.path.join(demo_root, "demo"), root / "demo")
    cache = str(tmp_path / "cache")
    first = zeroshot(str(root), str(tmp_path / "first"), cache, "DATASET.SUBSAMPLE_CLASSES", "base", capsys=capsys)
    assert first["feature_cache"]["test"]["images"] == "miss"
    split = __import__("json").load(open(root / "demo" / "data_split.json"))
    images = root / "demo" / "images"
    for rel, _, _ in split["test"]:
        with Image.open(images / rel) as im:
            size = im.size
        Image.new("RGB", size).save(images / rel)
    again = zeroshot(str(root), str(tmp_path / "again"), cache, "DATASET.SUBSAMPLE_CLASSES", "base", capsys=capsys)
    assert again["feature_cache"]["test"] == {"images": "miss", "encoded": first["num_samples"], "from_cache": 0}
    fresh = zeroshot(str(root), str(tmp_path / "fresh"), "", "DATASET.SUBSAMPLE_CLASSES", "base",
                     "TEST.FEATURE_CACHE", "''", capsys=capsys)
    assert "feature_cache" not in fresh
    assert (again["accuracy"], again["macro_f1"]) == (fresh["accuracy"], fresh["macro_f1"])
    assert again["accuracy"] != first["accuracy"]  # the black images are not classified as the drawn ones were
    (name,) = image_files(cache)
    assert len(__import__("safetensors").safe_open(os.path.join(cache, "images", name), "pt").get_tensor("features")) \
        == first["num_samples"]  # the stale rows were replaced, not kept beside the new ones
    hit = zeroshot(str(root), str(tmp_path / "hit"), cache, "DATASET.SUBSAMPLE_CLASSES", "base", capsys=capsys)
    assert hit["feature_cache"]["test"]["images"] == "hit" and hit["accuracy"] == fresh["accuracy"]

    # A file of the wrong width (checksum and key in order) is a miss that is rebuilt, not a traceback.
    path = os.path.join(cache, "images", name)
    rewrite(path, torch.randn(first["num_samples"], 7))
    wide = zeroshot(str(root), str(tmp_path / "wide"), cache, "DATASET.SUBSAMPLE_CLASSES", "base", capsys=capsys)
    assert wide["feature_cache"]["test"]["images"] == "miss" and wide["accuracy"] == fresh["accuracy"]
    log = (tmp_path / "wide" / "log.txt").read_text()
    assert log.count("not used, encoding again") == 1 and "7 wide" in log and "Traceback" not in log
    hit = zeroshot(str(root), str(tmp_path / "hit2"), cache, "DATASET.SUBSAMPLE_CLASSES", "base", capsys=capsys)
    assert hit["feature_cache"]["test"]["images"] == "hit"


def test_edited_or_foreign_files_are_misses(tmp_path):
    import json

    from safetensors import safe_open

    store = FeatureCache(str(tmp_path))
    key = {"dataset": "d", "split": "test", "backbone": "b"}
    names = [[f"img{i}.png", 100 + i, 7] for i in range(6)]
    truth = torch.randn(6, 8)
    calls = []

    def encode(indices):
        calls.append(len(indices))
        return truth[indices]

    store.image_features(key, names, encode, width=8)
    path = store.image_path(key)
    assert store.image_features(key, names, encode, width=8)[1] == 0

    def stored_rows():
        with safe_open(path, framework="pt") as f:
            return json.loads(f.metadata()["rows"])

    cases = {
        "values edited": lambda: rewrite(path, truth * 2, fix_checksum=False),
        "rows edited": lambda: rewrite(path, truth, rows=list(reversed(stored_rows())), fix_checksum=False),
        "float16": lambda: rewrite(path, truth.half()),
        "float64": lambda: rewrite(path, truth.double()),
        "wrong width": lambda: rewrite(path, torch.randn(6, 5)),
        "three dimensions": lambda: rewrite(path, truth.reshape(6, 2, 4)),
    }
    for what, damage in cases.items():
        damage()
        feats, encoded = store.image_features(key, names, encode, width=8)
        assert encoded == 6 and torch.equal(feats, truth), what
        assert store.image_features(key, names, encode, width=8)[1] == 0, what  # rebuilt

    # A changed image (other size or time) is encoded again and replaces its row.
    changed = [list(n) for n in names]
    changed[2][2] = 8
    feats, encoded = store.image_features(key, changed, lambda idx: torch.ones(len(idx), 8), width=8)
    assert encoded == 1 and torch.equal(feats[2], torch.ones(8)) and torch.equal(feats[0], truth[0])
    assert len(stored_rows()) == 6 and changed[2] in stored_rows() and names[2] not in stored_rows()
