"""Trainers registered in ``core.engine.TRAINER_REGISTRY``.

``register_all()`` imports every trainer module, which registers its trainer;
``extend_cfg`` does that and adds each trainer's config node (``TRAINER.<NAME>``)
so that any recipe's keys are known. Importing this package alone imports no
torch: ``TRAINER_NAMES`` answers ``python train.py --list`` at once (a test
checks it against the registry).
"""
import importlib

# Registered trainer name -> module that registers it.
TRAINER_MODULES = {
    "ZeroShotCLIP": "zsclip",
    "MedPromptCLIP": "medpromptclip",
    "CoOp": "coop",
    "CoCoOp": "cocoop",
    "IVLP": "ivlp",
    "MaPLe": "maple",
    "CLIP-Adapter": "clip_adapter",
    "Tip-Adapter": "tip_adapter",
    "Tip-Adapter-F": "tip_adapter_f",
    "LP": "linear_probe",
    "LP++": "lp_plus_plus",
}
TRAINER_NAMES = tuple(TRAINER_MODULES)


def register_all():
    """Import every trainer module (registering its trainer); returns the modules."""
    return [importlib.import_module(f".{module}", __name__) for module in TRAINER_MODULES.values()]


def extend_cfg(cfg):
    for module in register_all():
        module.extend_cfg(cfg)
