"""Trainers registered in ``core.engine.TRAINER_REGISTRY``.

Importing this package registers every trainer; ``extend_cfg`` adds each
trainer's config node (``TRAINER.<NAME>``) so that any recipe's keys are known.
"""
from . import medpromptclip, zsclip

_MODULES = [zsclip, medpromptclip]


def extend_cfg(cfg):
    for module in _MODULES:
        module.extend_cfg(cfg)
