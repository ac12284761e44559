"""BiomedCoOp's 11 datasets: shipped splits, layout, base/new rule, few-shot draws, names, missing split."""
import gzip
import hashlib
import json
import os
import sys

import pytest

from conftest import PROJECT_DIR
from core.data import DATASET_REGISTRY
from core.errors import UserError
from datasets.catalog import BIOMEDCOOP, CATALOG, GROUPS, default_backbone
from datasets.demo import draw_image
from datasets.split_files import SHIPPED_DIR, locate_split

REFERENCE_DIR = os.path.join(PROJECT_DIR, "..", "..", "shared", "reference", "biomedcoop_splits")

# sha256 of each original split_<DS>.json (the uncompressed text of the shipped file) and its
# train / val / test sizes, as the original repository has them.
PUBLISHED = {
    "BTMRI": ("9818f18eb8e7d211f3719b6bd9d1fa31eba24df2f1c3048766b2e25a26505025", (2854, 1141, 1717)),
    "BUSI": ("3117f49854e639920f85d3ea11e34ecbe261c390410b19c29c424e631396ed4f", (389, 155, 236)),
    "CHMNIST": ("61a8616d5a759646a272ef2f84b321ae0136c2f318e194c0a0f690a0aabe2f1d", (2496, 1000, 1504)),
    "COVID_19_BiomedCoOp": ("9c73d1ef14da6bae08de1108720f2df2883cf678fb6a52debf6bca6ae54e24d3", (10582, 4232, 6351)),
    "CTKidney": ("a711bdb6d171cb5ad7231a5ddda29d640459989e72d15726d3f64db740b0b54f", (6221, 2487, 3738)),
    "DermaMNIST": ("23892796a89275ce641fc4a1f16000e1e1c7cea90a5f1452c19b209be2c7eda6", (7006, 1003, 2005)),
    "KneeXray": ("e0590a075c2ccaf22a1372a1fa78845231d4b17a67901bab328f17649719bf37", (5778, 826, 1656)),
    "Kvasir": ("e4716c2bf50cf7e3809bfae98eeda6fb1f028e28370f57a367aa80efa0dd1fc7", (2000, 800, 1200)),
    "LungColon": ("02b10f1b789d7e27b9e7903c5e36501e9dabaa17a71fa5fb0fd41ecf1d4b63cb", (12500, 5000, 7500)),
    "RETINA": ("526b297caf66d7a69ed836565f6ac04f6a59db9e1b768d881e78836adc9a12ee", (2108, 841, 1268)),
}


def test_the_suite_is_eleven_rows_and_a_group_apart_from_the_projects_benchmarks():
    names = [e.name for e in BIOMEDCOOP]
    assert len(names) == 11 and GROUPS["biomedcoop"] == tuple(names)
    assert not set(names) & set(GROUPS["all"])
    # COVID_19 keeps its meaning; the suite's is another dataset in the same folder.
    assert CATALOG["COVID_19"].classnames == ("COVID", "Lung_Opacity", "Normal_lung", "Viral_pneumonia")
    assert CATALOG["COVID_19_BiomedCoOp"].dataset_dir == "COVID_19"
    assert default_backbone(names, "pmc-clip") == "biomedclip"
    assert default_backbone(["NCT", "BTMRI"], "pmc-clip") == "pmc-clip"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_split_is_the_published_file(name):
    with gzip.open(os.path.join(SHIPPED_DIR, f"{name}.json.gz"), "rb") as f:
        raw = f.read()
    digest, sizes = PUBLISHED[name]
    assert hashlib.sha256(raw).hexdigest() == digest
    split = json.loads(raw)
    assert tuple(len(split[k]) for k in ("train", "val", "test")) == sizes
    # Labels and class names come from the rows, in the catalog's (non-alphabetical) order.
    entry = CATALOG[name]
    names = {(label, classname) for rows in split.values() for _, label, classname in rows}
    assert names == set(enumerate(entry.classnames))
    reference = os.path.join(REFERENCE_DIR, f"{name.replace('_BiomedCoOp', '')}.json.gz")
    if os.path.isfile(reference):
        with gzip.open(reference, "rb") as f:
            assert json.loads(f.read()) == split


def cfg_for(root, name, **overrides):
    from core.config import get_cfg_default

    cfg = get_cfg_default()
    cfg.DATASET.ROOT, cfg.DATASET.NAME = str(root), name
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def write_suite_data(root, name, per_class=6):
    """Images in the suite's layout and a split file of the original's name and format."""
    entry = CATALOG[name]
    image_dir = root / entry.dataset_dir / entry.image_subdir
    split = {"train": [], "val": [], "test": []}
    for label, classname in enumerate(entry.classnames):
        folder = classname.replace(" ", "_")
        (image_dir / folder).mkdir(parents=True)
        for i in range(per_class + 4):
            draw_image("xray_ring", i + 10 * label, size=16).save(image_dir / folder / f"{i}.png")
            key = "train" if i < per_class else ("val" if i < per_class + 2 else "test")
            split[key].append([f"{folder}/{i}.png", label, classname])
    (root / entry.dataset_dir / entry.split_file).write_text(json.dumps(split))
    return split


def test_own_split_in_the_original_layout_base_new_and_shared_fewshot_draw(tmp_path):
    write_suite_data(tmp_path, "KneeXray")
    assert locate_split(str(tmp_path), CATALOG["KneeXray"]) == (str(tmp_path / "KneeXray" / "split_KneeXray.json"), "own")
    build = DATASET_REGISTRY.get("KneeXray")
    few = build(cfg_for(tmp_path, "KneeXray", **{"DATASET.NUM_SHOTS": 2, "SEED": 1}))
    # K shots per class for training, min(K, 4) per class for validation.
    assert len(few.train_x) == 5 * 2 and len(few.val) == 5 * 2
    few6 = build(cfg_for(tmp_path, "KneeXray", **{"DATASET.NUM_SHOTS": 6, "SEED": 1}))
    assert len(few6.val) == 5 * 2  # the split has 2 val images per class, fewer than min(6, 4)
    # Base: the first ceil(5/2) = 3 labels; base-to-new training is the few-shot draw of the base classes.
    base = build(cfg_for(tmp_path, "KneeXray", **{"DATASET.NUM_SHOTS": 2, "SEED": 1, "DATASET.SUBSAMPLE_CLASSES": "base"}))
    new = build(cfg_for(tmp_path, "KneeXray", **{"DATASET.SUBSAMPLE_CLASSES": "new"}))
    assert base.classnames == ["healthy knee", "doubtful osteoarthritis", "minimal osteoarthritis"]
    assert new.classnames == ["moderate osteoarthritis", "severe osteoarthritis"]
    assert sorted(d.impath for d in base.train_x) == sorted(d.impath for d in few.train_x if d.label < 3)
    assert sorted(os.listdir(tmp_path / "KneeXray" / "split_fewshot")) == ["shot_2-seed_1.json", "shot_6-seed_1.json"]


def test_both_covid_datasets_share_a_folder_without_mixing(tmp_path):
    write_suite_data(tmp_path, "COVID_19_BiomedCoOp")
    ours = tmp_path / "COVID_19"
    split = {"train": [], "val": [], "test": []}
    for label, classname in enumerate(CATALOG["COVID_19"].classnames):
        (ours / classname).mkdir()
        for i in range(4):
            draw_image("fundus_spots", i, size=16).save(ours / classname / f"{i}.png")
            split["train" if i < 3 else "test"].append([f"{classname}/{i}.png", label, classname])
    (ours / "data_split.json").write_text(json.dumps(split))
    suite = DATASET_REGISTRY.get("COVID_19_BiomedCoOp")(cfg_for(tmp_path, "COVID_19_BiomedCoOp", **{"DATASET.NUM_SHOTS": 1}))
    project = DATASET_REGISTRY.get("COVID_19")(cfg_for(tmp_path, "COVID_19", **{"DATASET.NUM_SHOTS": 1}))
    assert suite.classnames[0] == "covid lungs" and project.classnames[0] == "COVID"
    assert all("/COVID_19/COVID_19/" in d.impath for d in suite.train_x)
    assert not any("/COVID_19/COVID_19/" in d.impath for d in project.train_x)
    assert os.path.isfile(ours / "split_fewshot" / "shot_1-seed_1.json")
    assert os.path.isfile(ours / "split_fewshot" / "COVID_19_BiomedCoOp" / "shot_1-seed_1.json")


def test_octmnist_without_its_split_says_what_to_fetch(tmp_path):
    (tmp_path / "OCTMNIST").mkdir()
    with pytest.raises(UserError) as e:
        DATASET_REGISTRY.get("OCTMNIST")(cfg_for(tmp_path, "OCTMNIST"))
    message = str(e.value)
    assert "split_OCTMNIST.json" in message and "TahaKoleilat/BiomedCoOp" in message
    assert str(tmp_path / "OCTMNIST" / "split_OCTMNIST.json") in message and "make_split" in message
    assert "\n" not in message


def test_make_split_writes_the_suites_split_file_name(tmp_path):
    from datasets.make_split import make_split

    entry = CATALOG["OCTMNIST"]
    for classname in entry.classnames:
        folder = tmp_path / "OCTMNIST" / "OCTMNIST" / classname.replace(" ", "_")
        folder.mkdir(parents=True)
        for i in range(7):
            draw_image("xray_ring", i, size=16).save(folder / f"{i}.png")
    assert make_split(str(tmp_path), "OCTMNIST")["train"] == 4 * 4
    ds = DATASET_REGISTRY.get("OCTMNIST")(cfg_for(tmp_path, "OCTMNIST"))
    assert ds.classnames == list(entry.classnames) and ds.split_file.endswith("split_OCTMNIST.json")


def test_sweep_defaults_to_biomedclip_for_the_suite(monkeypatch):
    sys.path.insert(0, os.path.join(PROJECT_DIR, "scripts"))
    import sweep

    monkeypatch.delenv("BACKBONE", raising=False)
    assert sweep.Settings("biomedcoop").backbone == "biomedclip"
    assert sweep.Settings("BTMRI").backbone == "biomedclip"
    assert sweep.Settings("NCT").backbone == "pmc-clip" and sweep.Settings("demo").backbone == "demo-clip"
    monkeypatch.setenv("BACKBONE", "tiny-clip")
    assert sweep.Settings("biomedcoop").backbone == "tiny-clip"
