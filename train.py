r"""Train and evaluate a registered trainer on a registered dataset (Dassl's command line).

    python train.py --root DATA --trainer MedPromptCLIP \
        --dataset-config-file configs/datasets/demo.yaml \
        --config-file configs/trainers/MedPromptCLIP/base2new.yaml \
        --output-dir output/demo/MedPromptCLIP/seed1 --seed 1 DATASET.SUBSAMPLE_CLASSES base

Config merge order: defaults -> dataset YAML -> method YAML -> arguments -> KEY VALUE overrides.
A dataset of your own: --dataset-config-file DATA/<name>/dataset.yaml (its declaration).
Every run writes OUTPUT_DIR/results.json (atomically) and OUTPUT_DIR/log.txt.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings

PROJECT_DIR = os.path.dirname(os.path.abspath(__file__))
if PROJECT_DIR not in sys.path:
    sys.path.insert(0, PROJECT_DIR)

# torch, open_clip and the trainers are imported only once a run needs them, so --help and --list answer at once.
from core.config import get_cfg_default, merge_from_file, merge_from_list  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.utils import (  # noqa: E402
    WRITE_ERRNOS, logger, remove_stale_temp_files, set_random_seed, setup_logger, write_error_message, write_json_atomic,
)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="", help="folder holding the datasets (DATASET.ROOT)")
    p.add_argument("--output-dir", default="", help="output folder (OUTPUT_DIR)")
    p.add_argument("--resume", default="", help="folder of a run to resume from (RESUME)")
    p.add_argument("--seed", type=int, default=-1, help="random seed; negative = do not seed")
    p.add_argument("--trainer", default="", help="trainer name (TRAINER.NAME)")
    p.add_argument("--backbone", default="", help="backbone (MODEL.BACKBONE.NAME)")
    p.add_argument("--dataset-config-file", default="",
                   help="dataset YAML (configs/datasets/<name>.yaml) or a dataset declaration (DATA/<name>/dataset.yaml)")
    p.add_argument("--config-file", default="", help="method YAML (configs/trainers/<Trainer>/<recipe>.yaml)")
    p.add_argument("--eval-only", action="store_true", help="evaluate only (with --model-dir for learned weights)")
    p.add_argument("--model-dir", default="",
                   help="output folder of a training run (this project's or the original code's) to load weights from")
    p.add_argument("--load-epoch", type=int, default=None, help="epoch of the checkpoint to load (default: latest)")
    p.add_argument("--init-from", default="",
                   help="output folder of a MedPromptCLIP run (or of a run of the original code) whose text prompts "
                        "start this trainer (TRAINER.<NAME>.INIT_FROM)")
    p.add_argument("--feature-cache", default="",
                   help="folder of frozen image/text features shared by runs (TEST.FEATURE_CACHE; default: output root)")
    p.add_argument("--no-train", action="store_true", help="build the trainer and stop: checks config and data")
    p.add_argument("--list", action="store_true",
                   help="list trainers and datasets (with --root, also datasets declared there), then exit")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p


def setup_cfg(args):
    import trainers
    from core.engine import TRAINER_REGISTRY
    from datasets.declared import apply_declaration, is_declaration

    cfg = get_cfg_default()
    trainers.extend_cfg(cfg)
    if args.dataset_config_file:
        if os.path.isfile(args.dataset_config_file) and is_declaration(args.dataset_config_file):
            apply_declaration(cfg, args.dataset_config_file)
        else:
            merge_from_file(cfg, args.dataset_config_file)
    if args.config_file:
        merge_from_file(cfg, args.config_file)
    if args.root:
        cfg.DATASET.ROOT = args.root
    if args.output_dir:
        cfg.OUTPUT_DIR = args.output_dir
    if args.resume:
        cfg.RESUME = args.resume
    if args.seed >= 0:
        cfg.SEED = args.seed
    if args.trainer:
        cfg.TRAINER.NAME = args.trainer
    if args.backbone:
        cfg.MODEL.BACKBONE.NAME = args.backbone
    if args.feature_cache:
        cfg.TEST.FEATURE_CACHE = args.feature_cache
    merge_from_list(cfg, args.opts)
    if not cfg.TRAINER.NAME:
        raise UserError("no trainer given; pass --trainer NAME (python train.py --list shows them)")
    if args.init_from:
        key = TRAINER_REGISTRY.get(cfg.TRAINER.NAME).cfg_key
        if not key or "INIT_FROM" not in cfg.TRAINER[key]:
            raise UserError(f"--init-from: trainer {cfg.TRAINER.NAME} cannot start from MedPromptCLIP prompts")
        cfg.TRAINER[key].INIT_FROM = args.init_from
    if not cfg.DATASET.NAME:
        raise UserError("no dataset given; pass --dataset-config-file configs/datasets/<name>.yaml")
    cfg.freeze()
    return cfg


# Settings that change where a run writes or how much it logs, not what it computes: left out of its identity.
# Settings that change where and how fast a run computes, not what it computes.
NOT_IDENTITY = ("OUTPUT_DIR", "RESUME", "DATASET.ROOT", "DEVICE", "VERBOSE", "TRAIN.PRINT_FREQ", "NUM_THREADS",
                "DATALOADER.NUM_WORKERS", "TEST.FEATURE_CACHE")


def run_identity(cfg, args, known=None):
    """What makes two runs the same experiment: the resolved config and what it loads.

    Stored in results.json; a sweep reuses a finished run only if its identity equals the one asked for.
    Folders of other runs (--model-dir, INIT_FROM) are given relative to OUTPUT_DIR (a moved output root
    keeps its identities), with the identity hash of the run found there: a run loading retrained prompts
    is another run. ``known`` maps such folders (absolute) to identity hashes expected there; other folders
    are read from their results.json.
    """
    from core.engine import yaml_safe

    config = yaml_safe(cfg)
    for key in NOT_IDENTITY:
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        node.pop(leaf, None)
    out = os.path.abspath(cfg.OUTPUT_DIR)
    loads = {}

    def source(path):
        path = os.path.abspath(path)
        if known and path in known:
            found = known[path]
        else:
            try:
                with open(os.path.join(path, "results.json"), encoding="utf-8") as f:
                    found = identity_hash(json.load(f)["identity"])
            except (OSError, ValueError, KeyError, TypeError):
                found = None
        rel = os.path.relpath(path, out)
        loads[rel] = found
        return rel

    for node in config["TRAINER"].values():
        if isinstance(node, dict) and node.get("INIT_FROM"):
            node["INIT_FROM"] = source(node["INIT_FROM"])
    model_dir = source(args.model_dir) if args.model_dir else None
    return {"config": config, "eval_only": bool(args.eval_only), "model_dir": model_dir,
            "load_epoch": args.load_epoch, "loads": loads}


def identity_hash(identity):
    """A short fingerprint of a run identity (16 hex digits)."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def one_line(error):
    """The message of a UserError, also when a data-loader worker wrapped it in a traceback."""
    text = str(error).strip()
    if "Traceback" in text:
        text = text.splitlines()[-1].split("UserError: ", 1)[-1]
    return text


def list_names(root=""):
    """Trainer and dataset names, from tables: nothing heavy is imported."""
    from datasets.catalog import known_names
    from datasets.declared import scan
    from trainers import trainer_names

    _, problems = scan(root)
    print("trainers: " + ", ".join(trainer_names()))
    print("datasets: " + ", ".join(known_names()))
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)


def check_early(args, cfg=None):
    """Fail on an unknown trainer, dataset, key or backbone before the config dump and the model build.

    Without ``cfg`` (before the trainers, hence torch, are imported) only what the default config
    can tell: the trainer name, override keys outside TRAINER, and the dataset name.
    """
    from datasets.declared import entry_for_cfg, is_declaration
    from trainers import trainer_names

    name = cfg.TRAINER.NAME if cfg is not None else args.trainer
    if name and name not in trainer_names():
        raise UserError(f"unknown trainer '{name}'; trainers: {', '.join(trainer_names())}")
    if cfg is None:
        light = get_cfg_default()
        path = args.dataset_config_file
        if path and os.path.isfile(path) and not is_declaration(path):
            try:
                merge_from_file(light, path)
            except UserError:
                return  # a key only a trainer defines: setup_cfg reports anything wrong
        if len(args.opts) % 2 == 0:
            merge_from_list(light, [x for k, v in zip(args.opts[0::2], args.opts[1::2])
                                    if not k.startswith("TRAINER.") for x in (k, v)])
        light.DATASET.ROOT = args.root or light.DATASET.ROOT
        if light.DATASET.NAME and not (path and is_declaration(path)):
            entry_for_cfg(light)
        return
    from clipkit.backbones import check_backbone

    entry_for_cfg(cfg)
    check_backbone(cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.PRETRAINED, cfg.MODEL.BACKBONE.CACHE_DIR)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.list:
            list_names(args.root)
            return 0
        check_early(args)
        from core.engine import TRAINER_REGISTRY

        cfg = setup_cfg(args)
        check_early(args, cfg)
        identity = run_identity(cfg, args)
        if args.eval_only and args.model_dir and not os.path.isdir(args.model_dir):
            raise UserError(f"--model-dir {args.model_dir} does not exist; give the output folder of a training run")
        remove_stale_temp_files(cfg.OUTPUT_DIR)
        setup_logger(cfg.OUTPUT_DIR)
        logger.info(f"command: {' '.join(sys.argv)}")
        if cfg.SEED >= 0:
            set_random_seed(cfg.SEED)
        if cfg.VERBOSE:
            logger.info("config:\n" + cfg.dump())
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda msg, *a, **k: logger.info(f"warning: {msg}")
            trainer = TRAINER_REGISTRY.get(cfg.TRAINER.NAME)(cfg)
        if args.no_train:
            logger.info("--no-train: trainer built; nothing trained or evaluated")
            return 0
        results = None
        learnable = any(p.requires_grad for m in trainer._models.values() for p in m.parameters())
        if args.eval_only and learnable and not args.model_dir and not cfg.MODEL.INIT_WEIGHTS:
            raise UserError(
                f"{cfg.TRAINER.NAME} --eval-only needs --model-dir <output folder of its training run>; "
                f"without it the prompts would be untrained"
            )
        if not args.eval_only and cfg.OPTIM.MAX_EPOCH < 1:
            raise UserError(f"OPTIM.MAX_EPOCH must be at least 1 to train, not {cfg.OPTIM.MAX_EPOCH}")
        if args.eval_only:
            trainer.load_model(args.model_dir, epoch=args.load_epoch)
            results = trainer.test()
        else:
            trainer.train(trainer.start_epoch, trainer.max_epoch)
            if not cfg.TEST.NO_TEST:
                results = trainer.test()
        recipe = os.path.splitext(os.path.basename(args.config_file))[0] if args.config_file else None
        record = trainer.run_record(results, identity=identity, recipe=recipe, eval_only=args.eval_only,
                                    model_dir=args.model_dir, load_epoch=args.load_epoch)
        if cfg.TEST.COMPUTE_CMAT and getattr(trainer.evaluator, "cmat", None) is not None and results:
            write_json_atomic(os.path.join(cfg.OUTPUT_DIR, "cmat.json"), {
                "classnames": record["classnames"], "matrix": trainer.evaluator.cmat.tolist(),
            })
        write_json_atomic(os.path.join(cfg.OUTPUT_DIR, "results.json"), record)
        logger.info(f"results written to {os.path.join(cfg.OUTPUT_DIR, 'results.json')}")
        return 0
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full output folder
        if e.errno not in WRITE_ERRNOS:
            raise
        print(f"error: {write_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written to results.json", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
