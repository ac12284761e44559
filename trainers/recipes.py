"""Which recipe (configs/trainers/<trainer>/<name>.yaml) a sweep protocol uses, and what it resolves to.

The paper's MedPromptCLIP recipes are per dataset: one file holds a row per dataset
(``_PER_DATASET_``, applied by core.config.merge_from_file), so the file chosen here depends
only on the trainer, the protocol and, for CoOp's few-shot schedule, the number of shots.
The synthetic demo uses demo recipes where a trainer has them (``demo_<protocol>.yaml``, else
``demo.yaml``): the paper's schedules are sized for real data and would not suit its few samples.
"""
from __future__ import annotations

import os

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE_DIR = os.path.join(PROJECT_DIR, "configs", "trainers")
DEMO_DATASET = "demo"

# Recipe per trainer and protocol; protocols: base2new, fewshot, stacked (started from a
# MedPromptCLIP run), crossmodal. A trainer missing from a protocol uses the protocol's name.
RECIPES = {
    "MedPromptCLIP": {"base2new": "base2new", "fewshot": "specific_modal", "crossmodal": "multi_modal"},
    "ZeroShotCLIP": {"base2new": "template", "fewshot": "template", "crossmodal": "template"},
    "CoOp": {"base2new": "vit_b16_ep50_ctxv1", "fewshot": "vit_b16"},
    "CoCoOp": {"base2new": "vit_b16_c4_ep10_batch1_ctxv1", "fewshot": "vit_b16_c4_ep10_batch1_ctxv1"},
    "IVLP": {"base2new": "vit_b16_c2_ep5_batch4_2+2ctx", "fewshot": "vit_b16_c2_ep5_batch4_2+2ctx",
             "stacked": "medpromptclip_fewshot"},
    "MaPLe": {"base2new": "vit_b16_c2_ep5_batch4_2ctx", "fewshot": "vit_b16_c2_ep5_batch4_2ctx"},
}

# CoOp's few-shot schedule depends on the shots (CoOp's paper): 50 epochs for 1 shot, 100 for 2-4.
COOP_FEWSHOT_BY_SHOTS = {1: "vit_b16_ep50", 2: "vit_b16_ep100", 4: "vit_b16_ep100"}


def recipe_path(trainer, name):
    return os.path.join(RECIPE_DIR, trainer, f"{name}.yaml")


def recipe_file(trainer, protocol, dataset, shots=None):
    """Path of the recipe ``trainer`` runs with under ``protocol`` on ``dataset``."""
    if dataset == DEMO_DATASET:
        for name in (f"demo_{protocol}", "demo"):
            if os.path.isfile(recipe_path(trainer, name)):
                return recipe_path(trainer, name)
    if trainer == "CoOp" and protocol == "fewshot" and shots in COOP_FEWSHOT_BY_SHOTS:
        return recipe_path(trainer, COOP_FEWSHOT_BY_SHOTS[shots])
    return recipe_path(trainer, RECIPES.get(trainer, {}).get(protocol, protocol))


def resolve(trainer, config_file, dataset_config_file, opts=()):
    """The config a run with these files and overrides would use (frozen), without building anything."""
    import trainers
    from core.config import get_cfg_default, merge_from_file, merge_from_list
    from datasets.declared import merge_dataset_file

    cfg = get_cfg_default()
    trainers.extend_cfg(cfg)
    merge_dataset_file(cfg, dataset_config_file)
    merge_from_file(cfg, config_file)
    merge_from_list(cfg, list(opts))
    cfg.TRAINER.NAME = trainer
    cfg.freeze()
    return cfg


# Where each trainer that can start from MedPromptCLIP prompts keeps its text context size and depth
# (None: the trainer takes only the input context).
TEXT_PROMPT_KEYS = {
    "MedPromptCLIP": ("MEDPROMPTCLIP", "N_CTX", "PROMPT_DEPTH_TEXT"),
    "CoOp": ("COOP", "N_CTX", None),
    "IVLP": ("IVLP", "N_CTX_TEXT", "PROMPT_DEPTH_TEXT"),
    "MaPLe": ("MAPLE", "N_CTX", "PROMPT_DEPTH"),
}


def source_overrides(source_cfg, trainer, target_cfg):
    """KEY VALUE overrides that give a MedPromptCLIP run (config ``source_cfg``) the text prompt shape
    of ``trainer``'s config ``target_cfg``, so its prompts load with --init-from; [] when they already fit.
    The context then starts from the modality template's words, as in the paper's few-shot setting."""
    node, n_key, depth_key = TEXT_PROMPT_KEYS[trainer]
    n_ctx = target_cfg.TRAINER[node][n_key]
    depth = target_cfg.TRAINER[node][depth_key] if depth_key else None
    source = source_cfg.TRAINER.MEDPROMPTCLIP
    if source.N_CTX == n_ctx and (depth is None or source.PROMPT_DEPTH_TEXT == depth):
        return []
    overrides = ["TRAINER.MEDPROMPTCLIP.N_CTX", str(n_ctx), "TRAINER.MEDPROMPTCLIP.CTX_INIT", "template"]
    if depth is not None:
        overrides += ["TRAINER.MEDPROMPTCLIP.PROMPT_DEPTH_TEXT", str(depth)]
    return overrides
