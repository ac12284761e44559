"""The public API of a run, for scripts and benchmarks: what ``python train.py ARGS`` would compute.

    from runs import resolve_run, identity_hash, run
    cfg, identity = resolve_run(["--trainer", "CoOp", "--dataset-config-file", ..., "--seed", "1"])
    identity_hash(identity)   # 16 hex digits: two runs with the same hash are the same experiment
    run([...])                # train.py's exit status (0 done, 2 a user mistake)

Arguments are train.py's command line (``python train.py --help``). Nothing here builds a model
except :func:`build_trainer`.
"""
from __future__ import annotations

import train


def parse_args(argv):
    """train.py's arguments (argparse namespace) of the command line ``argv``."""
    return train.build_parser().parse_args(list(argv))


def resolve_run(argv, known=None):
    """(cfg, identity) of the run ``argv`` describes: its resolved, frozen config and what makes it
    the experiment it is (stored in results.json). ``known``: {absolute run folder: identity hash}
    of runs not yet on disk that this one loads (``--model-dir``, ``--init-from``)."""
    args = parse_args(argv)
    cfg = train.setup_cfg(args)
    return cfg, train.run_identity(cfg, args, known)


def identity_hash(identity):
    """A short fingerprint of a run identity (16 hex digits)."""
    return train.identity_hash(identity)


def not_identity():
    """Config keys that change where or how fast a run computes, not what: left out of its identity."""
    return tuple(train.NOT_IDENTITY)


def build_trainer(argv):
    """The trainer ``argv`` describes, built (backbone loaded, data read), logging to its OUTPUT_DIR."""
    from core.utils import setup_logger
    from trainers import trainer_class

    cfg, _ = resolve_run(argv)
    setup_logger(cfg.OUTPUT_DIR)
    return trainer_class(cfg.TRAINER.NAME)(cfg)


def run(argv):
    """Run ``python train.py argv`` in this process; its exit status."""
    return train.main(list(argv))
