"""A small framework core with Dassl's public names, hooks and config keys.

Plugins written for Dassl (CoOp-style trainers and datasets) find the same
entry points here: ``TRAINER_REGISTRY``/``TrainerX`` in :mod:`core.engine`,
``DATASET_REGISTRY``/``Datum``/``DatasetBase``/``DataManager`` in
:mod:`core.data`, ``get_cfg_default`` in :mod:`core.config`,
``build_optimizer``/``build_lr_scheduler`` in :mod:`core.optim` and
``build_evaluator`` in :mod:`core.evaluation`.
"""
