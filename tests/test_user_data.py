"""The paper's shipped splits, the split tool's paper algorithm, datasets declared in data, light commands."""
import json
import os
import subprocess
import sys
import warnings

import pytest
from PIL import Image

from conftest import DEMO_CFG, PROJECT_DIR, read_results, recipe, run_train
from core.config import get_cfg_default
from core.data import DATASET_REGISTRY
from datasets.catalog import BENCHMARKS, CATALOG
from datasets.make_split import make_split
from datasets.split_dataset import read_split_rows
from datasets.split_files import SHIPPED_DIR, image_folder, load_split_file, shipped_split

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=PROJECT_DIR, capture_output=True, text=True,
                          env=kwargs.pop("env", ENV), timeout=600, **kwargs)


def cfg_for(root, name, **overrides):
    cfg = get_cfg_default()
    cfg.DATASET.ROOT, cfg.DATASET.NAME = str(root), name
    cfg.merge_from_list([item for pair in overrides.items() for item in pair])
    return cfg


def touch_listed(root, name, count=None):
    """Empty files at the paths the shipped split of ``name`` lists (the first ``count`` of them)."""
    split, _ = load_split_file(shipped_split(name))
    base = image_folder(str(root), CATALOG[name])
    rows = [r for key in ("train", "val", "test") for r in split[key]][:count]
    for rel, _, _ in rows:
        path = os.path.join(base, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()
    return split


def test_shipped_splits_cover_22_benchmarks_and_agree_with_the_catalog():
    from datasets.catalog import BIOMEDCOOP

    shipped = sorted(f[:-len(".json.gz")] for f in os.listdir(SHIPPED_DIR))
    # And 10 of BiomedCoOp's 11 (OCTMNIST's published split is not in its repository).
    assert shipped == sorted([e.name for e in BENCHMARKS if e.name not in ("NCT", "SkinCancer")]
                             + [e.name for e in BIOMEDCOOP if e.name != "OCTMNIST"])
    for name in shipped:
        rows = read_split_rows(shipped_split(name), CATALOG[name])
        assert rows["train"] and rows["test"]


def test_catalog_cli_on_an_empty_root_then_a_few_images(tmp_path):
    out = cli("-m", "datasets", "--root", str(tmp_path)).stdout
    lines = {line.split()[0]: line for line in out.splitlines() if line and line.split()[0] in CATALOG}
    for entry in BENCHMARKS:
        expected = "split shipped, images missing" if shipped_split(entry.name) else "no split"
        assert expected in lines[entry.name], lines[entry.name]
    assert os.path.join(str(tmp_path), "ODIR", "odir") in lines["ODIR"]  # the image folder the split reads
    assert os.path.join(str(tmp_path), "ODIR", "odir", "normal", "772_right.jpg") in out  # first missing image
    touch_listed(tmp_path, "Head_CT", count=3)
    out = cli("-m", "datasets", "--root", str(tmp_path)).stdout
    head_ct = next(line for line in out.splitlines() if line.startswith("Head_CT "))
    assert "3/200" in head_ct and "partly present" in head_ct


def test_split_tool_rebuilds_a_shipped_split_row_for_row(tmp_path):
    shipped, digest = load_split_file(shipped_split("FFA"))
    touch_listed(tmp_path, "FFA")
    make_split(str(tmp_path), "FFA")
    rebuilt, rebuilt_digest = load_split_file(str(tmp_path / "FFA" / "data_split.json"))
    assert rebuilt == shipped  # same rows in the same order
    assert rebuilt_digest == digest  # and the same file text


def test_run_reads_the_shipped_split_unless_the_folder_has_its_own(tmp_path):
    shipped = touch_listed(tmp_path, "Head_CT")
    build = DATASET_REGISTRY.get("Head_CT")
    ds = build(cfg_for(tmp_path, "Head_CT"))
    assert ds.split_source == "shipped" and ds.split_sha256 == load_split_file(shipped_split("Head_CT"))[1]
    assert len(ds.train_x) == 140 and len(ds.test) == 30
    own = {"train": shipped["train"][:2], "test": shipped["test"][:1]}
    (tmp_path / "Head_CT" / "data_split.json").write_text(json.dumps(own))
    ds = build(cfg_for(tmp_path, "Head_CT"))
    assert ds.split_source == "own" and ds.split_file == str(tmp_path / "Head_CT" / "data_split.json")
    assert len(ds.train_x) == 2


def test_fewer_images_than_shots_warns_once_naming_the_class(tmp_path):
    names = [r[0] for r in touch_listed(tmp_path, "Head_CT")["train"]]
    rows = [[n, 0, "Normal_brain"] for n in names[:10]] + [[n, 1, "Brain_bleeding"] for n in names[10:30]]
    (tmp_path / "Head_CT" / "data_split.json").write_text(json.dumps({"train": rows, "test": rows[:2]}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DATASET_REGISTRY.get("Head_CT")(cfg_for(tmp_path, "Head_CT", **{"DATASET.NUM_SHOTS": 16, "SEED": 1}))
    messages = [str(w.message) for w in caught if "NUM_SHOTS" in str(w.message)]
    assert len(messages) == 1
    assert "'Normal_brain' has 10 training image(s), all 10 used" in messages[0] and "Brain_bleeding" not in messages[0]


def make_tree(root, name="MyScans", classes=("calm", "spotted", "striped", "dark"), per_class=6):
    for c, cls in enumerate(classes):
        folder = root / name / cls
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (24, 24), (40 * c + 10 * i, 90, 200 - 40 * c)).save(folder / f"{i:02d}.png")
    return root / name


def test_folder_dataset_from_tree_to_base2new_table(tmp_path):
    data = tmp_path / "data"
    folder = make_tree(data)
    (folder / "descriptions.json").write_text(json.dumps({c: [f"a {c} pattern fills the image."]
                                                          for c in ("calm", "spotted", "striped", "dark")}))
    made = cli("-m", "datasets.make_split", "--root", str(data), "--folder", "MyScans", "--modality", "dermoscopy",
               "--descriptions", "descriptions.json")
    assert made.returncode == 0, made.stderr
    assert (folder / "data_split.json").is_file() and (folder / "dataset.yaml").is_file()
    listed = cli("-m", "datasets", "--root", str(data)).stdout
    assert "MyScans" in listed and "own split, images present" in listed and "24/24" in listed
    env = dict(ENV, DATA=str(data), OUTPUT=str(tmp_path / "out"), BACKBONE="tiny-clip", SEEDS="1",
               METHODS="MedPromptCLIP CoOp ZeroShotCLIP", OPTS="OPTIM.MAX_EPOCH 1 DEVICE cpu")
    sweep = subprocess.run(["bash", "scripts/base2new.sh", "MyScans"], cwd=PROJECT_DIR, capture_output=True,
                           text=True, env=env, timeout=600)
    assert sweep.returncode == 0, sweep.stderr
    table = sweep.stdout.split("MyScans: base-to-new", 1)[1]
    for method in ("MedPromptCLIP", "CoOp", "ZeroShotCLIP"):
        assert method in table
    runs = tmp_path / "out" / "base2new" / "tiny-clip" / "MyScans"
    (coop_dir,) = runs.glob("shots_*/CoOp/*/seed1/base")
    coop = read_results(coop_dir)
    assert coop["split_source"] == "own" and coop["split_sha256"] == load_split_file(str(folder / "data_split.json"))[1]
    assert coop["dataset_declared_in"] == str(folder / "dataset.yaml")
    assert coop["classnames"] == ["calm", "dark"]  # sorted folders, first half
    log = (coop_dir / "log.txt").read_text()
    assert "class 'calm' has 4 training image(s), all 4 used" in log


def test_declared_dataset_without_descriptions_says_how_to_generate(tmp_path, capsys):
    make_tree(tmp_path, per_class=4)
    assert cli("-m", "datasets.make_split", "--root", str(tmp_path), "--folder", "MyScans").returncode == 0
    code, err = run_train("--root", tmp_path, "--trainer", "MedPromptCLIP",
                          "--dataset-config-file", tmp_path / "MyScans" / "dataset.yaml",
                          "--config-file", recipe("MedPromptCLIP", "specific_modal"), "--output-dir", tmp_path / "out",
                          "MODEL.BACKBONE.NAME", "tiny-clip", "DEVICE", "cpu", capsys=capsys)
    assert code == 2 and "no descriptions for MyScans" in err and "generate_descriptions.py MyScans --root" in err


def test_dataset_declared_by_config_keys(tmp_path):
    make_tree(tmp_path, name="Scans2", per_class=4)
    assert cli("-m", "datasets.make_split", "--root", str(tmp_path), "--folder", "Scans2").returncode == 0
    (tmp_path / "Scans2" / "dataset.yaml").unlink()
    config = tmp_path / "Scans2.yaml"
    config.write_text('DATASET:\n  NAME: "Scans2"\n  MODALITY: "ct"\n  CLASSNAMES: ["calm", "dark", "spotted", "striped"]\n')
    code = run_train("--root", tmp_path, "--trainer", "ZeroShotCLIP", "--dataset-config-file", config,
                     "--config-file", recipe("ZeroShotCLIP", "template"), "--output-dir", tmp_path / "out",
                     "--eval-only", "MODEL.BACKBONE.NAME", "tiny-clip", "DEVICE", "cpu")[0]
    assert code == 0
    result = read_results(tmp_path / "out")
    assert result["dataset"] == "Scans2" and result["num_samples"] == 4 and result["split_source"] == "own"


def test_sweep_without_data_names_the_image_folders(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/sweep.py", "base2new", "fundus"], cwd=PROJECT_DIR,
                          capture_output=True, text=True, timeout=120,
                          env=dict(ENV, DATA=str(tmp_path / "none"), OUTPUT=str(tmp_path / "out"), BACKBONE="tiny-clip"))
    assert proc.returncode == 2
    assert "shipped split found under " + os.path.join(str(tmp_path / "none"), "ODIR", "odir", "") in proc.stderr
    assert not (tmp_path / "out").exists()


LIGHT_COMMANDS = {
    "train.py --list": "import runpy, sys; sys.argv = ['train.py', '--list']; runpy.run_path('train.py', run_name='__main__')",
    "train.py --help": "import runpy, sys; sys.argv = ['train.py', '--help']; runpy.run_path('train.py', run_name='__main__')",
    "train.py with an unknown dataset": "import runpy, sys; sys.argv = ['train.py', '--trainer', 'CoOp', "
                                        "'--dataset-config-file', 'configs/datasets/demo.yaml', 'DATASET.NAME', 'Nope']; "
                                        "runpy.run_path('train.py', run_name='__main__')",
    "python -m datasets": "import runpy, sys; sys.argv = ['datasets']; runpy.run_module('datasets', run_name='__main__')",
    "make_split --help": "import runpy, sys; sys.argv = ['make_split', '--help']; "
                         "runpy.run_module('datasets.make_split', run_name='__main__')",
}


@pytest.mark.parametrize("command", list(LIGHT_COMMANDS))
def test_light_commands_import_no_torch(command):
    probe = (f"import sys\ntry:\n    {LIGHT_COMMANDS[command]}\nexcept SystemExit:\n    pass\n"
             "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'torchvision')))")
    proc = cli("-c", probe)
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []", proc.stdout[-500:] + proc.stderr[-500:]


def test_trainer_modules_found_without_import_match_the_registry():
    from core.engine import TRAINER_REGISTRY
    from trainers import trainer_names

    assert list(trainer_names()) == TRAINER_REGISTRY.registered_names()


def test_unknown_dataset_fails_before_the_log_and_config_dump(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_train("--root", tmp_path, "--trainer", "ZeroShotCLIP", "--dataset-config-file", DEMO_CFG,
                          "--config-file", recipe("ZeroShotCLIP", "template"), "--output-dir", out, "--eval-only",
                          "DATASET.NAME", "NoSuchSet", capsys=capsys)
    assert code == 2 and "unknown dataset 'NoSuchSet'" in err and "dataset.yaml" in err
    assert not out.exists()
