"""BiomedCoOp's prompt dictionary is parsed from a checkout, never run, and mapped to class names exactly."""
import json
import os
import textwrap

import pytest

from clipkit.biomedcoop_prompts import load_biomedcoop_prompts, main, read_prompt_dictionary
from clipkit.descriptions import descriptions_path, load_descriptions
from core.errors import UserError


def write_checkout(root, body, marker):
    """A fake checkout whose prompt_templates.py would write ``marker`` if it were ever imported or run."""
    trainers = root / "trainers"
    trainers.mkdir(parents=True, exist_ok=True)
    header = textwrap.dedent(f"""\
        import os
        os.system("touch {marker}")
        open({str(marker)!r}, "w").write("ran")
        CUSTOM_TEMPLATES = {{"BTMRI": "a photo of a {{}}."}}
        """)
    (trainers / "prompt_templates.py").write_text(header + textwrap.dedent(body), encoding="utf-8")
    return trainers / "prompt_templates.py"


GOOD = """\
BIOMEDCOOP_TEMPLATES = {
    "glioma tumor": [
        "first glioma sentence.",
        "second glioma " "sentence, joined by the parser.",
    ],
    'normal OCT scan': ("an OCT sentence.",),
    "unused class": ["never asked for."],
}
"""


def test_reads_literal_without_running_the_file(tmp_path):
    marker = tmp_path / "PWNED"
    path = write_checkout(tmp_path / "BiomedCoOp", GOOD, marker)
    for given in (tmp_path / "BiomedCoOp", path, path.parent):
        prompts = read_prompt_dictionary(str(given))
        assert prompts["glioma tumor"] == ["first glioma sentence.", "second glioma sentence, joined by the parser."]
        assert prompts["normal OCT scan"] == ["an OCT sentence."]
    got = load_biomedcoop_prompts(str(tmp_path / "BiomedCoOp"), ["normal OCT scan", "glioma tumor"])
    assert got == [["an OCT sentence."], ["first glioma sentence.", "second glioma sentence, joined by the parser."]]
    assert not marker.exists(), "the prompt file was executed"


def test_keys_are_case_sensitive_and_missing_classes_are_named_in_one_line(tmp_path):
    write_checkout(tmp_path, GOOD, tmp_path / "PWNED")
    with pytest.raises(UserError) as e:
        load_biomedcoop_prompts(str(tmp_path), ["glioma tumor", "normal oct scan", "pituitary tumor"])
    message = str(e.value)
    assert "\n" not in message
    assert "2 of 3 classes" in message
    assert "'normal oct scan' (the file has 'normal OCT scan'" in message
    assert "'pituitary tumor'" in message and "'glioma tumor'" not in message
    got = load_biomedcoop_prompts(str(tmp_path), ["pituitary tumor", "normal OCT scan"], allow_missing=True)
    assert got == [[], ["an OCT sentence."]]


@pytest.mark.parametrize("body, what", [
    ("BIOMEDCOOP_TEMPLATES = {'a': [__import__('os').system('touch x')]}\n", "function call"),
    ("BIOMEDCOOP_TEMPLATES = {'a': [s for s in ('x', 'y')]}\n", "list comprehension"),
    ("SENTENCES = ['x']\nBIOMEDCOOP_TEMPLATES = {'a': SENTENCES}\n", "variable name"),
    ("OTHER = {}\nBIOMEDCOOP_TEMPLATES = {**OTHER, 'a': ['x']}\n", "**"),
    ("BIOMEDCOOP_TEMPLATES = {NAME: ['x']}\n", "variable name"),
    ("BIOMEDCOOP_TEMPLATES = {'a': [f'x {1}']}\n", "f-string"),
    ("BIOMEDCOOP_TEMPLATES = {'a': ['x' + 'y']}\n", "operator expression"),
    ("BIOMEDCOOP_TEMPLATES = {'a': ['x', 3]}\n", "int constant"),
    ("BIOMEDCOOP_TEMPLATES = dict(a=['x'])\n", "function call"),
    ("BIOMEDCOOP_TEMPLATES = {k: ['x'] for k in 'ab'}\n", "dict comprehension"),
])
def test_anything_but_a_literal_is_refused(tmp_path, body, what):
    marker = tmp_path / "PWNED"
    write_checkout(tmp_path, body, marker)
    with pytest.raises(UserError) as e:
        read_prompt_dictionary(str(tmp_path))
    message = str(e.value)
    assert what in message and "\n" not in message and "never run" in message
    assert not marker.exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("body, what", [
    ("X = 1\n", "no top-level BIOMEDCOOP_TEMPLATES"),
    ("def f():\n    BIOMEDCOOP_TEMPLATES = {'a': ['x']}\n", "no top-level BIOMEDCOOP_TEMPLATES"),
    ("BIOMEDCOOP_TEMPLATES = {'a': ['x'\n", "not valid Python"),
])
def test_files_without_the_dictionary_are_refused(tmp_path, body, what):
    write_checkout(tmp_path, body, tmp_path / "PWNED")
    with pytest.raises(UserError, match=what):
        read_prompt_dictionary(str(tmp_path))


def test_a_folder_that_is_no_checkout_is_refused(tmp_path):
    with pytest.raises(UserError, match="neither a prompt_templates.py nor a BiomedCoOp checkout"):
        read_prompt_dictionary(str(tmp_path))


def test_descriptions_loader_reads_a_checkout_given_as_descriptions_dir(tmp_path):
    marker = tmp_path / "PWNED"
    path = write_checkout(tmp_path / "repo", GOOD, marker)
    for given in (tmp_path / "repo", path):
        assert descriptions_path("BTMRI", str(given)) == str(path)
        got = load_descriptions("BTMRI", ["glioma tumor"], str(given))
        assert got == [["first glioma sentence.", "second glioma sentence, joined by the parser."]]
    # An ordinary descriptions folder is still read as JSON files.
    folder = tmp_path / "json"
    folder.mkdir()
    (folder / "BTMRI.json").write_text(json.dumps({"Glioma_Tumor": ["json sentence."]}), encoding="utf-8")
    assert load_descriptions("BTMRI", ["glioma tumor"], str(folder)) == [["json sentence."]]
    assert not marker.exists()


def test_command_lists_and_writes_json_atomically(tmp_path, capsys):
    write_checkout(tmp_path / "repo", GOOD, tmp_path / "PWNED")
    assert main([str(tmp_path / "repo")]) == 0
    listed = capsys.readouterr().out
    assert "2  glioma tumor" in listed and "1  normal OCT scan" in listed
    out = tmp_path / "out.json"
    assert main([str(tmp_path / "repo"), "--classnames", "glioma tumor", "--out", str(out)]) == 0
    assert json.loads(out.read_text(encoding="utf-8")) == {
        "glioma tumor": ["first glioma sentence.", "second glioma sentence, joined by the parser."]}
    bad = tmp_path / "bad.json"
    assert main([str(tmp_path / "repo"), "--classnames", "meningioma tumor", "--out", str(bad)]) == 2
    assert "meningioma tumor" in capsys.readouterr().err
    assert not bad.exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_zero_shot_run_reads_a_checkout_end_to_end(tmp_path, demo_root, capsys):
    from conftest import DEMO_CFG, recipe, run_train
    from datasets.catalog import DEMO

    marker = tmp_path / "PWNED"
    entries = "".join(f"    {c!r}: ['a sketch of {c}.', 'marks drawn as {c}.'],\n" for c in DEMO.classnames)
    path = write_checkout(tmp_path / "repo", "BIOMEDCOOP_TEMPLATES = {\n" + entries + "}\n", marker)

    def args(out):
        return ["--root", demo_root, "--trainer", "ZeroShotCLIP", "--dataset-config-file", DEMO_CFG,
                "--config-file", recipe("ZeroShotCLIP", "descriptions"), "--eval-only", "--output-dir", str(out),
                "DATASET.DESCRIPTIONS_DIR", str(tmp_path / "repo")]

    code, err = run_train(*args(tmp_path / "out"), capsys=capsys)
    assert code == 0, err
    with open(tmp_path / "out" / "results.json") as f:
        results = json.load(f)
    assert str(path) in json.dumps(results)
    # A class the dictionary lacks: one line naming it, exit 2, no results.
    path.write_text(path.read_text().replace(f"    {DEMO.classnames[1]!r}:", "    'renamed':"), encoding="utf-8")
    code, err = run_train(*args(tmp_path / "bad"), capsys=capsys)
    assert code == 2 and f"'{DEMO.classnames[1]}'" in err and err.count("\n") == 1
    assert not (tmp_path / "bad" / "results.json").exists()
    assert not marker.exists()
