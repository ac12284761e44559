"""Which recipe (configs/trainers/<trainer>/<name>.yaml) a sweep protocol uses, and what it resolves to.

The paper's MedPromptCLIP recipes are per dataset: one file holds a row per dataset
(``_PER_DATASET_``, applied by core.config.merge_from_file), so the file chosen here depends
only on the trainer, the protocol and, for shot-dependent schedules, the number of shots.
Each trainer declares its recipes on its class (``RECIPES``, ``RECIPES_BY_SHOTS``,
``DEMO_RECIPES``, ``PROMPT_SHAPE_KEYS``: see trainers/base.py); nothing here names a trainer.
The synthetic demo uses the trainer's demo recipes where it has them: the paper's schedules
are sized for real data and would not suit its few samples.
"""
from __future__ import annotations

import os

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE_DIR = os.path.join(PROJECT_DIR, "configs", "trainers")
DEMO_DATASET = "demo"
PROTOCOLS = ("base2new", "fewshot", "crossmodal", "zeroshot", "stacked")


def recipe_path(trainer, name):
    return os.path.join(RECIPE_DIR, trainer, f"{name}.yaml")


def supports(trainer, protocol):
    """Whether ``trainer`` declares a recipe for ``protocol``."""
    from trainers import trainer_class

    return protocol in trainer_class(trainer).RECIPES


def recipe_file(trainer, protocol, dataset, shots=None):
    """Path of the recipe ``trainer`` runs with under ``protocol`` on ``dataset``.

    ``protocol`` may also be a recipe name (ZeroShotCLIP's prompt modes): names that are not one of
    the trainer's protocols are taken as they are.
    """
    from trainers import trainer_class

    cls = trainer_class(trainer)
    if dataset == DEMO_DATASET:
        name = cls.DEMO_RECIPES.get(protocol, cls.DEMO_RECIPES.get("default"))
        if name:
            return recipe_path(trainer, name)
    by_shots = cls.RECIPES_BY_SHOTS.get(protocol, {})
    if shots in by_shots:
        return recipe_path(trainer, by_shots[shots])
    return recipe_path(trainer, cls.RECIPES.get(protocol, protocol))


def resolve(trainer, config_file, dataset_config_file, opts=()):
    """The config a run with these files and overrides would use (frozen), without building anything."""
    import trainers
    from core.config import get_cfg_default, merge_from_file, merge_from_list

    cfg = get_cfg_default()
    trainers.extend_cfg(cfg)
    merge_from_file(cfg, dataset_config_file)
    merge_from_file(cfg, config_file)
    merge_from_list(cfg, list(opts))
    cfg.TRAINER.NAME = trainer
    cfg.freeze()
    return cfg


def source_overrides(source_cfg, trainer, target_cfg):
    """KEY VALUE overrides that give a MedPromptCLIP run (config ``source_cfg``) the text prompt shape
    of ``trainer``'s config ``target_cfg``, so its prompts load with --init-from; [] when they already fit.
    The context then starts from the modality template's words, as in the paper's few-shot setting."""
    from trainers import trainer_class

    node, n_key, depth_key = trainer_class(trainer).PROMPT_SHAPE_KEYS
    n_ctx = target_cfg.TRAINER[node][n_key]
    depth = target_cfg.TRAINER[node][depth_key] if depth_key else None
    source = source_cfg.TRAINER.MEDPROMPTCLIP
    if source.N_CTX == n_ctx and (depth is None or source.PROMPT_DEPTH_TEXT == depth):
        return []
    overrides = ["TRAINER.MEDPROMPTCLIP.N_CTX", str(n_ctx), "TRAINER.MEDPROMPTCLIP.CTX_INIT", "template"]
    if depth is not None:
        overrides += ["TRAINER.MEDPROMPTCLIP.PROMPT_DEPTH_TEXT", str(depth)]
    return overrides
