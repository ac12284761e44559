"""The training loop, with Dassl's hooks and checkpoint layout.

A trainer subclasses :class:`TrainerX` and overrides only what differs:
``build_model`` (and ``register_model``), ``forward_backward``, and where
needed ``build_data_loader``, ``parse_batch_train``/``parse_batch_test``,
``model_inference``, ``before/after_train`` and ``before/after_epoch``.
"""
from __future__ import annotations

import datetime
import os
import random
import time
from collections import OrderedDict

import numpy as np
import torch

from .checkpoint import CHECKPOINT_POINTER, load_checkpoint, read_pointer, resume_problem
from .data import DataManager
from .errors import UserError
from .evaluation import build_evaluator
from .registry import Registry
from .utils import atomic_open, logger, progress, resolve_device, save_torch_atomic

TRAINER_REGISTRY = Registry("trainer")


class AverageMeter:
    def __init__(self):
        self.sum = 0.0
        self.count = 0
        self.val = 0.0

    def update(self, val, n=1):
        self.val = float(val)
        self.sum += float(val) * n
        self.count += n

    @property
    def avg(self):
        return self.sum / max(self.count, 1)


class MetricMeter:
    def __init__(self):
        self.meters = OrderedDict()

    def update(self, summary):
        for k, v in (summary or {}).items():
            if torch.is_tensor(v):
                v = v.item()
            self.meters.setdefault(k, AverageMeter()).update(v)

    def __str__(self):
        return " ".join(f"{k} {m.val:.4f} ({m.avg:.4f})" for k, m in self.meters.items())


def trainable_state_dict(model):
    """Only the parameters that require gradients: what a prompt checkpoint holds."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return OrderedDict((k, v.detach().cpu().clone()) for k, v in model.state_dict().items() if k in trainable)


def schedule_settings(cfg):
    """The OPTIM settings a saved optimizer and learning-rate schedule depend on."""
    keys = ("NAME", "LR", "WEIGHT_DECAY", "MOMENTUM", "SGD_DAMPNING", "SGD_NESTEROV", "ADAM_BETA1", "ADAM_BETA2",
            "MAX_EPOCH", "LR_SCHEDULER", "STEPSIZE", "GAMMA", "WARMUP_EPOCH", "WARMUP_TYPE", "WARMUP_CONS_LR",
            "WARMUP_MIN_LR", "WARMUP_RECOUNT")
    return {k: (list(cfg.OPTIM[k]) if isinstance(cfg.OPTIM[k], (list, tuple)) else cfg.OPTIM[k]) for k in keys}


def rng_state():
    """The state of every random generator that drives shuffling and augmentation (plain values and tensors)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rng_state_problem(state):
    """What keeps ``state`` (from a checkpoint) from being restored by :func:`set_rng_state`, or None."""
    if not isinstance(state, dict):
        return "its random state is missing" if state is None else f"its random state is a {type(state).__name__}"
    python, numpy_state, cpu = state.get("python"), state.get("numpy"), state.get("torch")
    words = lambda values, n: (isinstance(values, (list, tuple)) and len(values) == n
                               and all(type(v) is int and 0 <= v < 2**32 for v in values))
    if not (isinstance(python, (list, tuple)) and len(python) == 3 and type(python[0]) is int
            and words(python[1], 625) and python[1][-1] <= 624 and (python[2] is None or type(python[2]) is float)):
        return "its Python random state is not (version, 625 words, gauss)"
    if not (isinstance(numpy_state, (list, tuple)) and len(numpy_state) == 5 and numpy_state[0] == "MT19937"
            and words(numpy_state[1], 624) and type(numpy_state[2]) is int and 0 <= numpy_state[2] <= 624
            and numpy_state[3] in (0, 1) and type(numpy_state[4]) is float):
        return "its NumPy random state is not MT19937 (name, 624 words, position, has_gauss, cached)"
    own = torch.get_rng_state()
    if not torch.is_tensor(cpu) or cpu.dtype != own.dtype or cpu.shape != own.shape:
        found = f"a {str(cpu.dtype)[6:]} tensor of shape {tuple(cpu.shape)}" if torch.is_tensor(cpu) else repr(cpu)[:40]
        return f"its torch random state is {found}, not a uint8 tensor of shape {tuple(own.shape)}"
    cuda = state.get("cuda")
    if cuda is not None and not (isinstance(cuda, (list, tuple))
                                 and all(torch.is_tensor(t) and t.dtype == torch.uint8 and t.dim() == 1 for t in cuda)):
        return "its CUDA random state is not a list of uint8 tensors"
    return None


def set_rng_state(state):
    """Restore what :func:`rng_state` saved, so a resumed run draws the numbers the interrupted one would have."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def yaml_safe(node):
    """A config (or any part of it) as plain dicts and lists, for JSON."""
    from yacs.config import CfgNode

    if isinstance(node, CfgNode):
        return {k: yaml_safe(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [yaml_safe(v) for v in node]
    return node


class TrainerBase:
    """Model registry, checkpointing and the epoch loop."""

    def __init__(self):
        self._models = OrderedDict()
        self._optims = OrderedDict()
        self._scheds = OrderedDict()

    def register_model(self, name="model", model=None, optim=None, sched=None):
        if name in self._models:
            raise KeyError(f"model '{name}' is already registered")
        self._models[name] = model
        self._optims[name] = optim
        self._scheds[name] = sched

    def get_model_names(self, names=None):
        names_real = list(self._models.keys())
        if names is not None:
            names = [names] if isinstance(names, str) else names
            for name in names:
                assert name in names_real
            return names
        return names_real

    def get_current_lr(self, names=None):
        name = self.get_model_names(names)[0]
        return self._optims[name].param_groups[0]["lr"]

    def checkpoint_settings(self):
        """{setting: value} a checkpoint must share with the model it is loaded into (trainer, backbone, shapes)."""
        return OrderedDict()

    def save_model(self, epoch, directory, is_best=False, val_result=None, model_name=""):
        """Write ``directory/<name>/model.pth.tar-<epoch>`` atomically for each registered model."""
        settings = dict(self.checkpoint_settings())
        losses = getattr(self, "epoch_losses", None)
        for name in self.get_model_names():
            optim, sched = self._optims[name], self._scheds[name]
            checkpoint = {
                "state_dict": trainable_state_dict(self._models[name]),
                "epoch": epoch + 1,
                "optimizer": optim.state_dict() if optim is not None else None,
                "scheduler": sched.state_dict() if sched is not None else None,
                "val_result": val_result,
                # What the learning-rate schedule depends on: a resume must use the same.
                "optim_cfg": schedule_settings(self.cfg) if hasattr(self, "cfg") else None,
                "trainer": settings.get("TRAINER.NAME"),
                "backbone": settings.get("MODEL.BACKBONE.NAME"),
                "settings": settings,
                # Random state after this epoch: a resumed run shuffles and augments as this one goes on to.
                "rng": rng_state(),
                # The last epoch's mean losses, so a run resumed after its last epoch still reports them.
                "train_loss": {k: m.avg for k, m in losses.meters.items()} if losses is not None else None,
            }
            fname = model_name or f"model.pth.tar-{epoch + 1}"
            model_dir = os.path.join(directory, name)
            save_torch_atomic(checkpoint, os.path.join(model_dir, fname))
            with atomic_open(os.path.join(model_dir, CHECKPOINT_POINTER), "w", encoding="utf-8") as f:
                f.write(fname + "\n")
            logger.info(f"checkpoint saved to {os.path.join(model_dir, fname)}")

    def resume_model_if_exist(self, directory):
        """Load the latest checkpoint of every model from ``directory``; return the epoch to start at."""
        paths = [read_pointer(os.path.join(directory, name)) for name in self.get_model_names()]
        if not all(paths):
            return 0
        start_epoch = 0
        for name, path in zip(self.get_model_names(), paths):
            checkpoint = load_checkpoint(path)
            saved = checkpoint.get("optim_cfg")
            if saved is not None and hasattr(self, "cfg") and saved != schedule_settings(self.cfg):
                changed = ", ".join(f"OPTIM.{k} {saved.get(k)} -> {v}" for k, v in schedule_settings(self.cfg).items()
                                    if saved.get(k) != v)
                raise UserError(
                    f"{directory} holds a run with other optimization settings ({changed}); resuming it needs the "
                    f"same settings: rerun with them, or give a new --output-dir"
                )
            max_epoch = getattr(self, "max_epoch", float("inf"))
            problem = (resume_problem(checkpoint, path, self._optims[name], self._scheds[name], max_epoch)
                       or rng_state_problem(checkpoint.get("rng")))
            if problem:
                raise UserError(
                    f"checkpoint {path} cannot be resumed: {problem}; it was not written by this run as configured: "
                    f"delete {os.path.dirname(path)} (or give a new --output-dir) and rerun"
                )
            self.load_checkpoint_into(name, checkpoint, path)
            if self._optims[name] is not None:
                self._optims[name].load_state_dict(checkpoint["optimizer"])
            if self._scheds[name] is not None:
                self._scheds[name].load_state_dict(checkpoint["scheduler"])
            set_rng_state(checkpoint["rng"])
            if checkpoint.get("train_loss"):
                self.epoch_losses = MetricMeter()
                self.epoch_losses.update(checkpoint["train_loss"])
            start_epoch = checkpoint["epoch"]
            logger.info(f"resumed {name} from {os.path.basename(path)} (next epoch {start_epoch + 1})")
        return start_epoch

    def load_checkpoint_into(self, name, checkpoint, source):
        """Check that ``checkpoint`` (a dict from :func:`load_checkpoint`) fits model ``name``, then load every tensor."""
        saved = checkpoint.get("settings")
        if isinstance(saved, dict):  # older checkpoints of this program do not record them
            current = self.checkpoint_settings()
            differing = [f"{k} {saved.get(k)!r} in the checkpoint, {current.get(k)!r} here"
                         for k in list(current) + [k for k in saved if k not in current] if saved.get(k) != current.get(k)]
            if differing:
                raise UserError(
                    f"checkpoint {source} was saved with other settings ({'; '.join(differing)}); "
                    f"use the saved run's settings, or a run made with these"
                )
        self._load_state(name, checkpoint["state_dict"], source)

    def _load_state(self, name, state_dict, source):
        model = self._models[name]
        own = dict(model.named_parameters())
        unknown = [k for k in state_dict if k not in own]
        if unknown:
            raise UserError(
                f"checkpoint {source} holds tensors this model does not have ({', '.join(unknown[:3])}); "
                f"was it written by another trainer or backbone?"
            )
        missing = [k for k, p in own.items() if p.requires_grad and k not in state_dict]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise UserError(
                f"checkpoint {source} lacks tensors this model learns ({', '.join(missing[:5])}{more}); they would "
                f"stay untrained: load a run made with the same trainer settings (e.g. prompt depth)"
            )
        for k, v in state_dict.items():
            if own[k].shape != v.shape:
                raise UserError(
                    f"checkpoint {source}: {k} has shape {tuple(v.shape)} but the model expects "
                    f"{tuple(own[k].shape)}; use the same trainer settings and backbone as the saved run"
                )
        with torch.no_grad():
            for k, v in state_dict.items():
                own[k].copy_(v.to(own[k].device, own[k].dtype))

    def load_model(self, directory, epoch=None):
        """Load saved tensors from a run folder (``--model-dir``), epoch given or the latest."""
        if not directory:
            logger.info("load_model() skipped: no model folder given")
            return
        for name in self.get_model_names():
            model_dir = os.path.join(directory, name)
            if epoch is not None:
                path = os.path.join(model_dir, f"model.pth.tar-{epoch}")
            else:
                path = read_pointer(model_dir)
                if path is None:
                    raise UserError(
                        f"no checkpoint of '{name}' in {directory} (expected {os.path.join(model_dir, CHECKPOINT_POINTER)}); "
                        f"point --model-dir at the output folder of a finished training run of the same trainer"
                    )
            checkpoint = load_checkpoint(path)
            self.load_checkpoint_into(name, checkpoint, path)
            logger.info(f"loaded weights of {name} from {path} (epoch {checkpoint.get('epoch')})")

    def load_init_weights(self, name, path):
        """MODEL.INIT_WEIGHTS: every learnable tensor of ``name`` from one checkpoint file."""
        self.load_checkpoint_into(name, load_checkpoint(path), path)
        logger.info(f"initialized {name} from {path}")

    def set_model_mode(self, mode="train", names=None):
        for name in self.get_model_names(names):
            if mode == "train":
                self._models[name].train()
            else:
                self._models[name].eval()

    def update_lr(self, names=None):
        for name in self.get_model_names(names):
            if self._scheds[name] is not None:
                self._scheds[name].step()

    def detect_anomaly(self, loss):
        if not torch.isfinite(loss).all():
            raise FloatingPointError("loss is infinite or NaN; lower OPTIM.LR or use PREC fp32")

    def model_zero_grad(self, names=None):
        for name in self.get_model_names(names):
            if self._optims[name] is not None:
                self._optims[name].zero_grad(set_to_none=True)

    def model_backward(self, loss):
        self.detect_anomaly(loss)
        loss.backward()

    def model_update(self, names=None):
        for name in self.get_model_names(names):
            if self._optims[name] is not None:
                self._optims[name].step()

    def model_backward_and_update(self, loss, names=None):
        self.model_zero_grad(names)
        self.model_backward(loss)
        self.model_update(names)

    def train(self, start_epoch, max_epoch):
        self.start_epoch = start_epoch
        self.max_epoch = max_epoch
        self.before_train()
        for self.epoch in range(self.start_epoch, self.max_epoch):
            self.before_epoch()
            self.run_epoch()
            self.after_epoch()
        self.after_train()

    def before_train(self):
        pass

    def after_train(self):
        pass

    def before_epoch(self):
        pass

    def after_epoch(self):
        pass

    def run_epoch(self):
        raise NotImplementedError

    def test(self, split=None):
        raise NotImplementedError

    def parse_batch_train(self, batch):
        raise NotImplementedError

    def parse_batch_test(self, batch):
        raise NotImplementedError

    def forward_backward(self, batch):
        raise NotImplementedError

    def model_inference(self, input):
        raise NotImplementedError


class SimpleTrainer(TrainerBase):
    """Builds data and model from the config; trains, tests and records results."""

    def __init__(self, cfg):
        super().__init__()
        self.check_cfg(cfg)
        self.device = resolve_device(cfg.DEVICE)
        self.start_epoch = self.epoch = 0
        self.max_epoch = cfg.OPTIM.MAX_EPOCH
        self.output_dir = cfg.OUTPUT_DIR
        self.cfg = cfg
        # Facts a trainer wants in results.json (e.g. which prompts it loaded).
        self.run_info = OrderedDict()
        self.build_data_loader()
        self.build_model()
        self.evaluator = build_evaluator(cfg, lab2cname=self.lab2cname)
        self.best_result = -float("inf")

    def check_cfg(self, cfg):
        """Validate settings before anything is built or trained; raise UserError on a bad one."""
        if cfg.TEST.SPLIT not in ("test", "val"):
            raise UserError(f"TEST.SPLIT must be test or val, not '{cfg.TEST.SPLIT}'")

    def build_data_loader(self):
        dm = DataManager(self.cfg)
        self.train_loader_x = dm.train_loader_x
        self.val_loader = dm.val_loader
        self.test_loader = dm.test_loader
        self.num_classes = dm.num_classes
        self.lab2cname = dm.lab2cname
        self.dm = dm

    def build_model(self):
        raise NotImplementedError

    def checkpoint_settings(self):
        settings = super().checkpoint_settings()
        settings["TRAINER.NAME"] = self.cfg.TRAINER.NAME
        return settings

    def before_train(self):
        directory = self.cfg.OUTPUT_DIR
        if self.cfg.RESUME:
            directory = self.cfg.RESUME
        self.start_epoch = self.resume_model_if_exist(directory)
        self.time_start = time.time()

    def after_train(self):
        logger.info("finished training")
        if self.max_epoch > self.start_epoch or not self.has_checkpoint():
            self.save_model(self.max_epoch - 1, self.output_dir)
        elapsed = datetime.timedelta(seconds=round(time.time() - self.time_start))
        logger.info(f"elapsed: {elapsed}")

    def has_checkpoint(self):
        return all(
            os.path.isfile(os.path.join(self.output_dir, n, CHECKPOINT_POINTER)) for n in self.get_model_names()
        )

    def after_epoch(self):
        last_epoch = (self.epoch + 1) == self.max_epoch
        freq = self.cfg.TRAIN.CHECKPOINT_FREQ
        if not last_epoch and freq > 0 and (self.epoch + 1) % freq == 0:
            self.save_model(self.epoch, self.output_dir)

    @torch.no_grad()
    def test(self, split=None):
        """Evaluate on ``split`` (default ``TEST.SPLIT``) and return the metrics dict."""
        self.set_model_mode("eval")
        self.evaluator.reset()
        split = split or self.cfg.TEST.SPLIT
        if split not in ("test", "val"):
            raise UserError(f"TEST.SPLIT must be test or val, not '{split}'")
        loader = self.val_loader if split == "val" else self.test_loader
        if loader is None:
            raise UserError(f"the {split} split of {self.cfg.DATASET.NAME} is empty; nothing to evaluate")
        logger.info(f"evaluate on the *{split}* set")
        start, count = time.time(), 0
        for logits, labels in self.eval_outputs(split, loader):
            self.evaluator.process(logits, labels)
            count += len(labels)
        elapsed = time.time() - start
        logger.info(f"evaluated {count} images in {elapsed:.1f}s ({count / max(elapsed, 1e-9):.0f} images/s)")
        results = self.evaluator.evaluate()
        results["split"] = split
        return results

    def eval_outputs(self, split, loader):
        """(logits, labels) batches of a split; trainers may compute them differently (e.g. from cached features)."""
        for batch in progress(loader, f"evaluate {split}", min_total=10):
            images, labels = self.parse_batch_test(batch)
            yield self.model_inference(images), labels

    def parse_batch_test(self, batch):
        return batch["img"].to(self.device, non_blocking=True), batch["label"].to(self.device, non_blocking=True)

    def model_inference(self, input):
        return self.model(input)


    # What the trainer learns from, read by sweeps and tables: "zero-shot" (nothing is trained),
    # "text-only" (no image is seen in training), "image-trained" (prompts trained on few-shot images)
    # or "feature-based" (a model on frozen features of few-shot images).
    KIND = "image-trained"

    def method_label(self):
        """The method's name in tables: the trainer, and what it started from or how it prompts."""
        return self.cfg.TRAINER.NAME

    def run_record(self, results, identity=None, recipe=None, eval_only=False, model_dir="", load_epoch=None):
        """The content of results.json: what ran (identity, labels), what it gave, and the full config."""
        classnames = getattr(self, "classnames", None) or [self.lab2cname[i] for i in sorted(self.lab2cname)]
        cfg = self.cfg
        record = {
            "trainer": cfg.TRAINER.NAME,
            "method": self.method_label(),
            "kind": self.KIND,
            "recipe": recipe,
            "dataset": cfg.DATASET.NAME,
            "subsample": cfg.DATASET.SUBSAMPLE_CLASSES,
            "num_shots": cfg.DATASET.NUM_SHOTS,
            "seed": cfg.SEED,
            "backbone": cfg.MODEL.BACKBONE.NAME,
            "epochs": cfg.OPTIM.MAX_EPOCH,
            "split": None,
            "num_samples": None,
            "accuracy": None,
            "macro_f1": None,
            "kappa": None,
            "auc": None,
            "specificity": None,
            "ece": None,
            "classnames": list(classnames),
            "eval_only": bool(eval_only),
            "model_dir": model_dir or None,
            "load_epoch": load_epoch,
            "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        if results:
            record.update({k: v for k, v in results.items() if k != "error_rate"})
        losses = getattr(self, "epoch_losses", None)
        if losses is not None and losses.meters:
            record["train_loss"] = {k: m.avg for k, m in losses.meters.items()}
        record.update(self.run_info)
        record["identity"] = identity
        record["config"] = yaml_safe(cfg)
        return record


class TrainerX(SimpleTrainer):
    """Trainer over a labelled training set (``train_loader_x``)."""

    def run_epoch(self):
        self.set_model_mode("train")
        losses = MetricMeter()
        loader = self.train_loader_x
        if loader is None:
            raise UserError(f"the training split of {self.cfg.DATASET.NAME} is empty; nothing to train on")
        self.num_batches = len(loader)
        if self.epoch == self.start_epoch or getattr(self, "_progress", None) is None:
            # One bar for the whole training: epochs of a few batches would flash past one by one.
            total = (self.max_epoch - self.start_epoch) * self.num_batches
            self._progress = progress(range(total), "train", min_total=1)
        bar = self._progress
        end = time.time()
        images = 0
        for self.batch_idx, batch in enumerate(loader):
            loss_summary = self.forward_backward(batch)
            losses.update(loss_summary)
            if isinstance(batch, dict) and torch.is_tensor(batch.get("img")):
                images += len(batch["img"])
            bar.update(1)
            bar.set_description(f"epoch {self.epoch + 1}/{self.max_epoch}", refresh=False)
            bar.set_postfix_str(" ".join(f"{k} {m.avg:.4f}" for k, m in losses.meters.items()))
            if (self.batch_idx + 1) % max(self.cfg.TRAIN.PRINT_FREQ, 1) == 0 or self.batch_idx + 1 == self.num_batches:
                logger.info(
                    f"epoch [{self.epoch + 1}/{self.max_epoch}] batch [{self.batch_idx + 1}/{self.num_batches}] "
                    f"{losses} lr {self.get_current_lr():.4e} time {time.time() - end:.2f}s"
                    + (f" ({images / max(time.time() - end, 1e-9):.0f} images/s)" if images else "")
                )
        if self.epoch + 1 >= self.max_epoch:
            bar.close()
            self._progress = None
        self.epoch_losses = losses

    def parse_batch_train(self, batch):
        return batch["img"].to(self.device, non_blocking=True), batch["label"].to(self.device, non_blocking=True)
