"""Trainers are found and described from their own modules: discovery, declarations, sweep checks, run API."""
import ast
import os
import sys

import pytest

from conftest import PROJECT_DIR

sys.path.insert(0, os.path.join(PROJECT_DIR, "scripts"))
import sweep  # noqa: E402


def test_registered_classes_are_read_from_the_source():
    from trainers import _registered_names

    source = (
        "from core.engine import TRAINER_REGISTRY\n"
        "class Helper:\n    pass\n"
        "@TRAINER_REGISTRY.register()\nclass Plain:\n    pass\n"
        "@TRAINER_REGISTRY.register(name='Renamed')\nclass Other:\n    pass\n"
        "@other.register()\nclass NotATrainer:\n    pass\n"
    )
    assert _registered_names(ast.parse(source)) == ["Plain", "Renamed"]


def test_every_registered_trainer_lives_in_the_module_found_for_it():
    from core.engine import TRAINER_REGISTRY
    from trainers import trainer_modules

    for name, module in trainer_modules().items():
        assert TRAINER_REGISTRY.get(name).__module__ == f"trainers.{module}"


def test_default_methods_come_from_the_trainers_declarations():
    from trainers import trainer_class, trainer_names

    base2new = sweep.default_methods("base2new")
    fewshot = sweep.default_methods("fewshot")
    assert base2new == [n for n in base2new if "base2new" in trainer_class(n).DEFAULT_IN]
    assert set(base2new) == {n for n in trainer_names() if "base2new" in trainer_class(n).DEFAULT_IN}
    stacked = {n + "+MedPromptCLIP" for n in trainer_names() if "stacked" in trainer_class(n).DEFAULT_IN}
    assert stacked and stacked <= set(fewshot)
    kinds = [trainer_class(m.removesuffix("+MedPromptCLIP")).KIND for m in base2new]
    assert kinds[0] == "zero-shot" and kinds.index("text-only") < kinds.index("image-trained")


def test_a_method_without_the_protocols_recipe_is_refused_in_one_line(monkeypatch, tmp_path, capsys):
    from trainers import trainer_class

    cls = trainer_class("CoCoOp")
    monkeypatch.setattr(cls, "RECIPES", {"base2new": cls.RECIPES["base2new"]})
    monkeypatch.setenv("METHODS", "CoCoOp")
    monkeypatch.setenv("OUTPUT", str(tmp_path / "out"))
    monkeypatch.setenv("DATA", str(tmp_path / "data"))
    assert sweep.main(["fewshot", "demo", "--status"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CoCoOp has no fewshot recipe" in err[0] and "base2new" in err[0]
    assert not (tmp_path / "out").exists()


def test_stacking_is_refused_for_a_trainer_that_cannot_start_from_prompts(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("METHODS", "CoCoOp+MedPromptCLIP")
    monkeypatch.setenv("OUTPUT", str(tmp_path / "out"))
    assert sweep.main(["fewshot", "demo", "--status"]) == 2
    assert "CoCoOp+MedPromptCLIP is not a method" in capsys.readouterr().err


def test_run_api_resolves_what_train_py_would_run(demo_root, tmp_path):
    import runs
    from trainers.recipes import recipe_file

    argv = ["--root", demo_root, "--trainer", "CoOp", "--seed", "3",
            "--dataset-config-file", os.path.join(PROJECT_DIR, "configs", "datasets", "demo.yaml"),
            "--config-file", recipe_file("CoOp", "fewshot", "demo", 1), "--output-dir", str(tmp_path / "a"),
            "DATASET.NUM_SHOTS", "1"]
    cfg, identity = runs.resolve_run(argv)
    assert cfg.SEED == 3 and cfg.OPTIM.MAX_EPOCH == 50 and identity["config"]["SEED"] == 3
    # Where a run writes is not what it is; its seed is.
    moved = runs.resolve_run([*argv[:-4], "--output-dir", str(tmp_path / "b"), *argv[-2:]])[1]
    assert runs.identity_hash(moved) == runs.identity_hash(identity)
    other = runs.resolve_run([a if a != "3" else "4" for a in argv])[1]
    assert runs.identity_hash(other) != runs.identity_hash(identity)
    assert "OUTPUT_DIR" in runs.not_identity()
