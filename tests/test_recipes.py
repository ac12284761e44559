"""Recipes resolve to the published values: the paper's per-dataset rows, aliases, the sweeps' choice."""
import os

import pytest
import yaml

from conftest import PROJECT_DIR, recipe
from core.errors import UserError
from trainers.recipes import recipe_file, resolve


def setup(trainer, config_file, dataset, *opts):
    """The config train.py builds for --trainer/--dataset-config-file/--config-file."""
    import train

    args = train.build_parser().parse_args([
        "--trainer", trainer, "--config-file", config_file,
        "--dataset-config-file", os.path.join(PROJECT_DIR, "configs", "datasets", f"{dataset}.yaml"), *opts,
    ])
    return train.setup_cfg(args)


# The original code's configs/trainers/specific_modal/<dataset>.yaml:
# lr, epochs, warm-up epochs, warm-up lr, weight decay, text pairs per step, loss.
PAPER = {
    "ODIR": (0.002, 50, 5, 1e-5, 5e-4, 256, "l1"),
    "Knee": (0.005, 72, 3, 1e-4, 0.1, 256, "mse"),
    "SLO": (0.03, 48, 5, 1e-5, 0.15, 256, "mse"),
    "Head_CT": (0.001, 72, 3, 1e-4, 0.1, 256, "mse"),
    "SkinCancer": (0.005, 72, 3, 1e-4, 0.1, 128, "mse"),
}


@pytest.mark.parametrize("name", ["specific_modal", "base2new"])
@pytest.mark.parametrize("dataset", sorted(PAPER))
def test_medpromptclip_recipes_resolve_to_the_papers_values(name, dataset):
    cfg = setup("MedPromptCLIP", recipe("MedPromptCLIP", name), dataset)
    o = cfg.OPTIM
    got = (o.LR, o.MAX_EPOCH, o.WARMUP_EPOCH, o.WARMUP_CONS_LR, o.WEIGHT_DECAY, cfg.DATALOADER.TRAIN_X.BATCH_SIZE,
           cfg.TRAINER.MEDPROMPTCLIP.LOSS)
    assert got == PAPER[dataset]
    assert (o.NAME, o.ADAM_BETA2, o.LR_SCHEDULER, o.WARMUP_TYPE) == ("adamw", 0.98, "cosine", "constant")
    assert cfg.TRAINER.MEDPROMPTCLIP.N_CTX == 6 and cfg.TRAINER.MEDPROMPTCLIP.PROMPT_DEPTH_TEXT == 9


def test_every_benchmark_has_a_paper_row_and_overrides_still_win():
    from datasets.catalog import BENCHMARKS

    with open(recipe("MedPromptCLIP", "specific_modal"), encoding="utf-8") as f:
        rows = yaml.safe_load(f)["_PER_DATASET_"]
    assert sorted(rows) == sorted(e.name for e in BENCHMARKS)
    cfg = setup("MedPromptCLIP", recipe("MedPromptCLIP", "specific_modal"), "Knee", "OPTIM.LR", "0.5")
    assert cfg.OPTIM.LR == 0.5 and cfg.OPTIM.MAX_EPOCH == 72
    # Dataset-specific normalization comes with the row; the demo has no row and keeps the backbone's.
    assert cfg.INPUT.PIXEL_MEAN == (0.60761009,) * 3
    assert setup("MedPromptCLIP", recipe("MedPromptCLIP", "specific_modal"), "demo").INPUT.PIXEL_MEAN == ()


def test_papers_fewshot_setting_is_the_stacked_ivlp_recipe():
    cfg = setup("IVLP", recipe("IVLP", "stacked"), "ODIR")
    t = cfg.TRAINER.IVLP
    assert (t.N_CTX_TEXT, t.N_CTX_VISION, t.PROMPT_DEPTH_TEXT, t.PROMPT_DEPTH_VISION) == (4, 4, 9, 9)
    assert (cfg.OPTIM.NAME, cfg.OPTIM.LR, cfg.OPTIM.MAX_EPOCH, cfg.DATALOADER.TRAIN_X.BATCH_SIZE) == ("adamw", 1e-5, 40, 2)
    assert cfg.OPTIM.WARMUP_EPOCH == 0
    assert setup("IVLP", recipe("IVLP", "stacked"), "SLO").OPTIM.MAX_EPOCH == 48


@pytest.mark.parametrize("trainer, alias, published", [
    ("MaPLe", "base2new", "vit_b16_c2_ep5_batch4_2ctx"),
    ("IVLP", "fewshot", "vit_b16_c2_ep5_batch4_2+2ctx"),
    ("CoOp", "fewshot", "vit_b16"),
    ("CoOp", "base2new", "vit_b16_ep50_ctxv1"),
    ("CoCoOp", "base2new", "vit_b16_c4_ep10_batch1_ctxv1"),
])
def test_short_names_are_aliases_of_the_published_files(trainer, alias, published):
    assert setup(trainer, recipe(trainer, alias), "ODIR") == setup(trainer, recipe(trainer, published), "ODIR")


def test_published_baseline_values():
    maple = setup("MaPLe", recipe("MaPLe", "vit_b16_c2_ep5_batch4_2ctx"), "ODIR")
    assert (maple.TRAINER.MAPLE.N_CTX, maple.TRAINER.MAPLE.CTX_INIT, maple.TRAINER.MAPLE.PROMPT_DEPTH) == (2, "a photo of a", 9)
    assert (maple.OPTIM.LR, maple.OPTIM.MAX_EPOCH, maple.DATALOADER.TRAIN_X.BATCH_SIZE) == (0.0035, 5, 4)
    ivlp = setup("IVLP", recipe("IVLP", "vit_b16_c2_ep5_batch4_2+2ctx"), "ODIR").TRAINER.IVLP
    assert (ivlp.N_CTX_TEXT, ivlp.N_CTX_VISION, ivlp.PROMPT_DEPTH_TEXT, ivlp.PROMPT_DEPTH_VISION) == (2, 2, 12, 12)
    coop = setup("CoOp", recipe("CoOp", "vit_b16_ep50_ctxv1"), "ODIR")
    assert (coop.TRAINER.COOP.CTX_INIT, coop.OPTIM.MAX_EPOCH, coop.DATALOADER.TRAIN_X.BATCH_SIZE) == ("a photo of a", 50, 32)


def test_sweeps_pick_demo_recipes_for_the_demo_and_coops_schedule_by_shots():
    assert recipe_file("MedPromptCLIP", "base2new", "demo").endswith(os.path.join("MedPromptCLIP", "demo.yaml"))
    assert recipe_file("MedPromptCLIP", "base2new", "ODIR").endswith(os.path.join("MedPromptCLIP", "base2new.yaml"))
    assert recipe_file("IVLP", "stacked", "demo").endswith("demo_stacked.yaml")
    assert recipe_file("IVLP", "stacked", "ODIR").endswith("medpromptclip_fewshot.yaml")
    assert recipe_file("MaPLe", "base2new", "demo").endswith("vit_b16_c2_ep5_batch4_2ctx.yaml")
    epochs = [resolve("CoOp", recipe_file("CoOp", "fewshot", "ODIR", k), os.path.join(PROJECT_DIR, "configs", "datasets",
                                                                                    "ODIR.yaml")).OPTIM.MAX_EPOCH
              for k in (1, 2, 4, 8, 16)]
    assert epochs == [50, 100, 100, 200, 200]


def test_recipe_file_mistakes_are_clear_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("_BASE_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_BASE_: a.yaml\n")
    with pytest.raises(UserError, match="includes itself"):
        setup("MaPLe", str(tmp_path / "a.yaml"), "ODIR")
    (tmp_path / "c.yaml").write_text("_BASE_: missing.yaml\n")
    with pytest.raises(UserError, match="not found"):
        setup("MaPLe", str(tmp_path / "c.yaml"), "ODIR")
    (tmp_path / "d.yaml").write_text("_PER_DATASET_:\n  ODIR:\n    OPTIM.LERNING_RATE: 0.1\n")
    with pytest.raises(UserError, match="_PER_DATASET_ ODIR: .*LERNING_RATE"):
        setup("MaPLe", str(tmp_path / "d.yaml"), "ODIR")
    assert setup("MaPLe", str(tmp_path / "d.yaml"), "SLO").OPTIM.LR == 0.002  # other rows are not read
