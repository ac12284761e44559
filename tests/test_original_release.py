"""Files of the original release as input: its templates/ description files."""
import hashlib
import json
import os

import pytest

from conftest import PROJECT_DIR, read_results, recipe, run_train
from clipkit.descriptions import descriptions_path, load_descriptions
from core.errors import UserError

ODIR_3X200_CFG = os.path.join(PROJECT_DIR, "configs", "datasets", "ODIR_3x200.yaml")
# A small file in the original's format: raw keys with underscores, a key of a class ODIR_3x200 lacks.
ORIGINAL_ODIR = {
    "age-related_macular_degeneration": ["yellow drusen around the macula."],
    "cataract": ["a hazy view of the retina.", "vessels blurred by lens opacity."],
    "myopia": ["a tilted optic disc with peripapillary atrophy."],
    "normal": ["a sharp optic disc and clear vessels.", "an even orange background."],
}


def write_templates(folder, content=ORIGINAL_ODIR, name="ODIR.json"):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(content, f)
    return path


def odir_root(tmp_path):
    """A data root with an (empty) ODIR_3x200 image folder: text-only training reads no image."""
    os.makedirs(tmp_path / "data" / "ODIR_3x200" / "odir_3x200", exist_ok=True)
    return str(tmp_path / "data")


def train_args(root, out, *extra):
    return ["--root", root, "--trainer", "MedPromptCLIP", "--dataset-config-file", ODIR_3X200_CFG,
            "--config-file", recipe("MedPromptCLIP", "specific_modal"), "--output-dir", out, "--seed", "1",
            "MODEL.BACKBONE.NAME", "tiny-clip", "OPTIM.MAX_EPOCH", "1", "TEST.NO_TEST", "True", *extra]


def test_original_file_names_and_raw_keys(tmp_path):
    folder = str(tmp_path / "templates")
    assert descriptions_path("ODIR_3x200", f"original:{folder}") == os.path.join(folder, "ODIR.json")
    assert descriptions_path("SkinCancer", f"original:{folder}") == os.path.join(folder, "Skincancer.json")
    assert descriptions_path("SLO", f"original:{folder}") == os.path.join(folder, "SLO.json")
    write_templates(folder)
    texts = load_descriptions("ODIR", ["age-related macular degeneration", "cataract"], f"original:{folder}")
    assert texts == [ORIGINAL_ODIR["age-related_macular_degeneration"], ORIGINAL_ODIR["cataract"]]


@pytest.mark.parametrize("how", ["file", "folder"])
def test_training_on_the_original_odir_file(tmp_path, capsys, how):
    path = write_templates(str(tmp_path / "templates"))
    out = str(tmp_path / "out")
    option = ["DATASET.DESCRIPTIONS_FILE", path] if how == "file" else \
        ["DATASET.DESCRIPTIONS_DIR", f"original:{tmp_path / 'templates'}"]
    code, err = run_train(*train_args(odir_root(tmp_path), out, *option), capsys=capsys)
    assert code == 0, err
    results = read_results(out)
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert results["description_files"] == [{"dataset": "ODIR_3x200", "path": path, "sha256": sha,
                                              "source": "file" if how == "file" else "original"}]
    # normal (2) + myopia (1) + cataract (2): exactly the file's texts of the dataset's classes.
    assert results["train_pairs"] == 5 and results["train_classes"] == 3


def test_training_reads_exactly_the_files_texts(tmp_path):
    import train

    path = write_templates(str(tmp_path / "templates"))
    args = train.build_parser().parse_args(train_args(odir_root(tmp_path), str(tmp_path / "run"),
                                                      "DATASET.DESCRIPTIONS_FILE", path, "DEVICE", "cpu"))
    from core.engine import TRAINER_REGISTRY

    trainer = TRAINER_REGISTRY.get("MedPromptCLIP")(train.setup_cfg(args))
    _ = trainer.train_loader_x.pairs
    expected = [t for c in ("normal", "myopia", "cataract") for t in ORIGINAL_ODIR[c]]
    assert trainer.train_descriptions == expected


def test_missing_class_is_one_line_error_and_nothing_written(tmp_path, capsys):
    content = {k: v for k, v in ORIGINAL_ODIR.items() if k != "myopia"}
    path = write_templates(str(tmp_path / "templates"), content)
    out = str(tmp_path / "out")
    code, err = run_train(*train_args(odir_root(tmp_path), out, "DATASET.DESCRIPTIONS_FILE", path), capsys=capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "myopia" in lines[0] and path in lines[0] and "MISSING_DESCRIPTIONS skip" in lines[0]
    assert not os.path.exists(os.path.join(out, "results.json"))
    assert not os.path.isdir(os.path.join(out, "prompt_learner"))
    # Opting in trains on the other classes, as the original code did, and says which were left out.
    code, err = run_train(*train_args(odir_root(tmp_path), out, "DATASET.DESCRIPTIONS_FILE", path,
                                      "TRAINER.MEDPROMPTCLIP.MISSING_DESCRIPTIONS", "skip"), capsys=capsys)
    assert code == 0, err
    results = read_results(out)
    assert results["classes_without_descriptions"] == ["myopia"] and results["train_pairs"] == 4


def test_missing_original_file_is_an_error(tmp_path):
    with pytest.raises(UserError, match="Skincancer.json not found"):
        load_descriptions("SkinCancer", ["x"], f"original:{tmp_path}")


def test_tables_name_description_files_other_than_the_projects(tmp_path):
    from test_sweeps import aggregate, write_result

    root = str(tmp_path / "runs")
    for subsample in ("base", "new"):
        path = write_result(root, "A", "MedPromptCLIP", 1, subsample, 50)
        with open(os.path.join(path, "results.json")) as f:
            record = json.load(f)
        record["description_files"] = [{"dataset": "A", "path": "/x/templates/ODIR.json", "sha256": "ab" * 32,
                                        "source": "original"}]
        with open(os.path.join(path, "results.json"), "w") as f:
            json.dump(record, f)
    aggregate.report("base2new", root, quiet=True)
    table = open(os.path.join(root, "summary.md")).read()
    assert "descriptions: /x/templates/ODIR.json (sha256 abababababab)" in table
