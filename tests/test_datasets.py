"""Catalog, generic split dataset, demo data and the split tool."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from conftest import PROJECT_DIR
from core.config import get_cfg_default
from core.data import DATASET_REGISTRY
from core.errors import UserError
from datasets.catalog import BENCHMARKS, CATALOG, DEMO, GROUPS, resolve_target
from datasets.demo import CLASS_LOOKS, SPLIT_SIZES, draw_image, generate_demo
from datasets.make_split import make_split


def test_catalog_registers_24_benchmarks_and_demo():
    assert len(BENCHMARKS) == 24
    for name in CATALOG:
        assert name in DATASET_REGISTRY
        assert os.path.isfile(os.path.join(PROJECT_DIR, "configs", "datasets", f"{name}.yaml"))
    assert set(GROUPS["eye"]) == {"ODIR_3x200", "ODIR", "f1000images", "OCT_C8", "OCTDL", "SLID_E", "SLO", "FFA", "modaldiff"}
    assert resolve_target("fundus") == ["ODIR_3x200", "ODIR", "f1000images"]
    assert resolve_target("demo") == ["demo"]
    with pytest.raises(KeyError, match="unknown dataset or group"):
        resolve_target("retina")


def test_catalog_cli_lists_everything(tmp_path):
    (tmp_path / "NCT").mkdir()
    (tmp_path / "NCT" / "data_split.json").write_text("{}")
    out = subprocess.run([sys.executable, "-m", "datasets", "--root", str(tmp_path)], cwd=PROJECT_DIR,
                         capture_output=True, text=True, check=True).stdout
    for name in CATALOG:
        assert name in out
    nct = next(line for line in out.splitlines() if line.startswith("NCT "))
    odir = next(line for line in out.splitlines() if line.startswith("ODIR "))
    assert "own split, lists no images" in nct and "split shipped, images missing" in odir


def test_demo_is_deterministic_and_has_styles_and_findings(tmp_path):
    assert len(DEMO.classnames) == 12 and list(CLASS_LOOKS) == list(DEMO.classnames)
    # Every style shows every finding once; each half has one code-named class per style.
    assert sorted(CLASS_LOOKS.values()) == sorted((s, f) for s in ("fundus", "xray", "tissue")
                                                  for f in ("spots", "ring", "streaks", "blob"))
    for half in (DEMO.classnames[:6], DEMO.classnames[6:]):
        coded = [c for c in half if c != "_".join(CLASS_LOOKS[c])]
        assert sorted(CLASS_LOOKS[c][0] for c in coded) == ["fundus", "tissue", "xray"]
    # More training images per class than 16 shots, so the few-shot subset depends on the seed.
    assert SPLIT_SIZES["train"] > 16
    assert draw_image("fundus_spots", 3).tobytes() == draw_image("fundus_spots", 3).tobytes()
    assert draw_image("fundus_spots", 3).tobytes() != draw_image("fundus_ring", 3).tobytes()
    a, b = tmp_path / "a" / "demo", tmp_path / "b" / "demo"
    generate_demo(str(a))
    generate_demo(str(b))
    digest = lambda p: hashlib.sha1((p / "data_split.json").read_bytes()).hexdigest()
    assert digest(a) == digest(b)
    split = json.loads((a / "data_split.json").read_text())
    assert {row[1] for row in split["test"]} == set(range(12))
    first = split["train"][0][0]
    assert (a / "images" / first).read_bytes() == (b / "images" / first).read_bytes()
    assert not any(p.name.startswith(".demo-") for p in (tmp_path / "a").iterdir())


def cfg_for(root, name, **overrides):
    cfg = get_cfg_default()
    cfg.DATASET.ROOT = str(root)
    cfg.DATASET.NAME = name
    for k, v in overrides.items():
        node = cfg
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return cfg


def test_split_dataset_base_new_and_fewshot(demo_root):
    build = DATASET_REGISTRY.get("demo")
    base = build(cfg_for(demo_root, "demo", **{"DATASET.SUBSAMPLE_CLASSES": "base"}))
    new = build(cfg_for(demo_root, "demo", **{"DATASET.SUBSAMPLE_CLASSES": "new"}))
    assert base.classnames == list(DEMO.classnames[:6]) and new.classnames == list(DEMO.classnames[6:])
    assert {d.label for d in new.test} == set(range(6))
    assert all(d.classname in new.classnames for d in new.test)
    fs = build(cfg_for(demo_root, "demo", **{"DATASET.NUM_SHOTS": 2, "SEED": 3}))
    assert len(fs.train_x) == 24
    assert os.path.isfile(os.path.join(demo_root, "demo", "split_fewshot", "shot_2-seed_3.json"))


def write_tree(root, dataset, counts):
    entry = CATALOG[dataset]
    image_dir = root / entry.dataset_dir / entry.image_subdir if entry.image_subdir else root / entry.dataset_dir
    for cls, n in counts.items():
        (image_dir / cls).mkdir(parents=True)
        for i in range(n):
            draw_image("xray_ring", i, size=16).save(image_dir / cls / f"{i}.png")
    return image_dir


def test_split_tool_is_stratified(tmp_path):
    write_tree(tmp_path, "Head_CT", {"Normal_brain": 20, "brain bleeding": 40})
    counts = make_split(str(tmp_path), "Head_CT")
    assert counts == {"train": 42, "val": 9, "test": 9}
    split = json.loads((tmp_path / "Head_CT" / "data_split.json").read_text())
    per = lambda key, label: sum(r[1] == label for r in split[key])
    assert (per("train", 0), per("val", 0), per("test", 0)) == (14, 3, 3)
    assert (per("train", 1), per("val", 1), per("test", 1)) == (28, 6, 6)
    assert split["train"][0][2] in ("Normal_brain", "Brain_bleeding")
    ds = DATASET_REGISTRY.get("Head_CT")(cfg_for(tmp_path, "Head_CT"))
    assert len(ds.train_x) == 42 and ds.classnames == ["Normal_brain", "Brain_bleeding"]
    with pytest.raises(UserError, match="already exists"):
        make_split(str(tmp_path), "Head_CT")


def test_split_tool_rejects_unknown_class_folder(tmp_path):
    write_tree(tmp_path, "Head_CT", {"Normal_brain": 2, "tumour": 2})
    with pytest.raises(UserError, match="'tumour' .* not a class of Head_CT"):
        make_split(str(tmp_path), "Head_CT")


def test_base_new_names_follow_labels_when_a_class_has_no_rows(tmp_path, demo_root):
    import shutil

    shutil.copytree(os.path.join(demo_root, "demo"), tmp_path / "demo", ignore=shutil.ignore_patterns("split_fewshot"))
    split = json.loads((tmp_path / "demo" / "data_split.json").read_text())
    for key in split:
        split[key] = [row for row in split[key] if row[1] != 2]
    (tmp_path / "demo" / "data_split.json").write_text(json.dumps(split))
    build = DATASET_REGISTRY.get("demo")
    for subsample in ("base", "new"):
        ds = build(cfg_for(tmp_path, "demo", **{"DATASET.SUBSAMPLE_CLASSES": subsample}))
        assert all(ds.classnames[d.label] == d.classname for d in ds.train_x + ds.test)
    assert "W4" in build(cfg_for(tmp_path, "demo", **{"DATASET.SUBSAMPLE_CLASSES": "base"})).classnames


def test_fewshot_cache_of_another_split_is_resampled(tmp_path, demo_root):
    import shutil

    shutil.copytree(os.path.join(demo_root, "demo"), tmp_path / "demo", ignore=shutil.ignore_patterns("split_fewshot"))
    build = DATASET_REGISTRY.get("demo")
    cfg = cfg_for(tmp_path, "demo", **{"DATASET.NUM_SHOTS": 2, "SEED": 1})
    first = {d.impath for d in build(cfg).train_x}
    split = json.loads((tmp_path / "demo" / "data_split.json").read_text())
    split["train"], split["test"] = split["test"], split["train"]
    (tmp_path / "demo" / "data_split.json").write_text(json.dumps(split))
    second = build(cfg)
    test_paths = {d.impath for d in second.test}
    assert not {d.impath for d in second.train_x} & test_paths
    assert first & test_paths  # the old sample would have trained on test images
