"""Trainers registered in ``core.engine.TRAINER_REGISTRY``.

Importing this package registers every trainer; ``extend_cfg`` adds each
trainer's config node (``TRAINER.<NAME>``) so that any recipe's keys are known.
"""
from . import cocoop, coop, ivlp, maple, medpromptclip, zsclip

_MODULES = [zsclip, medpromptclip, coop, cocoop, ivlp, maple]


def extend_cfg(cfg):
    for module in _MODULES:
        module.extend_cfg(cfg)
