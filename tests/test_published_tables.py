"""The suite's tables print the published averages beside the rows measured here, over the same datasets."""
import json
import os

import pytest

from conftest import PROJECT_DIR
from test_sweeps import aggregate, write_result


def published():
    with open(os.path.join(PROJECT_DIR, "configs", "published", "biomedcoop.json"), encoding="utf-8") as f:
        return json.load(f)


def test_published_file_matches_the_suite():
    from datasets.catalog import GROUPS

    suite = published()
    assert suite["fewshot"]["datasets"] == list(GROUPS["biomedcoop"])
    assert suite["base2new"]["datasets"] == [d for d in GROUPS["biomedcoop"] if d != "BUSI"]
    assert suite["fewshot"]["rows"]["BiomedCoOp"]["16"] == 72.42 and suite["base2new"]["rows"]["KgCoOp"]["hm"] == 64.61


def test_fewshot_table_of_the_suite_shows_published_and_measured_rows(tmp_path, capsys):
    root = str(tmp_path)
    for dataset, acc in (("BTMRI", 70.0), ("KneeXray", 50.0)):
        write_result(root, dataset, "BiomedCoOp", 1, "all", acc, shots=1, folder="s1")
        write_result(root, dataset, "MedPromptCLIP", 1, "all", acc - 20, folder="m")
    data = aggregate.report("fewshot", root)
    out = capsys.readouterr().out
    rows = {(r["method"], r["source"]): r for r in data["published"]["rows"]}
    assert rows[("BiomedCoOp", "measured")]["1"] == pytest.approx(60.0) and rows[("BiomedCoOp", "measured")]["datasets"] == 2
    assert rows[("BiomedCoOp", "published")]["1"] == 57.03
    assert rows[("MedPromptCLIP", "measured")]["16"] == pytest.approx(40.0)
    assert ("Tip-Adapter-F", "published") in rows and ("Tip-Adapter-F", "measured") not in rows
    line = next(x for x in out.splitlines() if x.startswith("BiomedCoOp ") and x.split()[1] == "measured")
    assert "60.0 (2/11)" in line
    assert "average over its 11 datasets" in out
    with open(os.path.join(root, "summary.md"), encoding="utf-8") as f:
        assert "| BiomedCoOp" in f.read().split("BiomedCoOp benchmark", 1)[1]


def test_base2new_table_averages_over_the_ten_datasets(tmp_path):
    root = str(tmp_path)
    write_result(root, "BTMRI", "KgCoOp", 1, "base", 80.0)
    write_result(root, "BTMRI", "KgCoOp", 1, "new", 40.0)
    data = aggregate.report("base2new", root, quiet=True)
    rows = {(r["method"], r["source"]): r for r in data["published"]["rows"]}
    assert len(data["published"]["datasets"]) == 10
    assert rows[("KgCoOp", "measured")]["hm_of_averages"] == pytest.approx(2 * 80 * 40 / 120)
    assert rows[("KgCoOp", "published")]["base"] == 68.36


def test_other_datasets_get_no_published_rows(tmp_path):
    root = str(tmp_path)
    write_result(root, "NCT", "CoOp", 1, "all", 70.0, shots=1)
    write_result(root, "BTMRI", "CoOp", 1, "all", 70.0, shots=1)
    assert aggregate.report("fewshot", root, quiet=True)["published"] is None
