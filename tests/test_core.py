"""The Dassl-compatible core: config, registry, optimizers, schedules, evaluator, few-shot sampling."""
import json
import os

import numpy as np
import pytest
import torch

from core.config import get_cfg_default, merge_from_file, merge_from_list
from core.data import DatasetBase, Datum, load_or_sample_fewshot
from core.errors import UserError
from core.evaluation import build_evaluator
from core.optim import build_lr_scheduler, build_optimizer
from core.registry import Registry
from core.utils import resolve_device, write_json_atomic


def full_cfg():
    import trainers

    cfg = get_cfg_default()
    trainers.extend_cfg(cfg)
    return cfg


def test_unknown_keys_are_errors(tmp_path):
    cfg = full_cfg()
    with pytest.raises(UserError, match="unknown config key OPTIM.LRR"):
        merge_from_list(cfg, ["OPTIM.LRR", "0.1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("OPTIM:\n  LRR: 0.1\n")
    with pytest.raises(UserError, match="bad.yaml"):
        merge_from_file(cfg, str(bad))


def test_merge_order_file_then_overrides(tmp_path):
    cfg = full_cfg()
    a = tmp_path / "a.yaml"
    a.write_text("OPTIM:\n  LR: 0.5\n  MAX_EPOCH: 3\n")
    merge_from_file(cfg, str(a))
    merge_from_list(cfg, ["OPTIM.LR", "0.25"])
    assert cfg.OPTIM.LR == 0.25 and cfg.OPTIM.MAX_EPOCH == 3


def test_every_default_key_has_a_comment():
    """Each key assignment in core/config.py is preceded by a comment (or shares one with its neighbours)."""
    import inspect

    import core.config as module

    lines = inspect.getsource(module).splitlines()
    uncommented = []
    for i, line in enumerate(lines):
        if line.startswith("_C.") and "= CN()" not in line and not line.startswith("_C.VERSION"):
            j = i - 1
            while j >= 0 and lines[j].startswith("_C.") and "= CN()" not in lines[j]:
                j -= 1
            if not lines[j].lstrip().startswith("#"):
                uncommented.append(line)
    assert uncommented == []


def test_registry_unknown_name_lists_known():
    reg = Registry("thing")

    @reg.register()
    class Foo:
        pass

    reg.register(object, name="bar")
    assert reg.get("Foo") is Foo and reg.get("bar") is object
    with pytest.raises(UserError, match="unknown thing 'baz'; registered: bar, Foo"):
        reg.get("baz")


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(UserError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA"):
            resolve_device("cuda:0")


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizers_only_take_trainable_parameters(name):
    cfg = full_cfg()
    cfg.OPTIM.NAME = name
    model = torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    optim = build_optimizer(model, cfg.OPTIM)
    params = [p for g in optim.param_groups for p in g["params"]]
    assert len(params) == 1 and params[0] is model.weight


def test_cosine_with_constant_warmup():
    cfg = full_cfg()
    cfg.OPTIM.update({"NAME": "adamw", "LR": 0.1, "MAX_EPOCH": 10, "LR_SCHEDULER": "cosine",
                      "WARMUP_EPOCH": 2, "WARMUP_TYPE": "constant", "WARMUP_CONS_LR": 1e-5})
    optim = build_optimizer(torch.nn.Linear(2, 2), cfg.OPTIM)
    sched = build_lr_scheduler(optim, cfg.OPTIM)
    lrs = []
    for _ in range(12):
        lrs.append(optim.param_groups[0]["lr"])
        optim.step()
        sched.step()
    assert lrs[0] == lrs[1] == 1e-5
    assert lrs[2] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    # state round-trip for resume
    state = sched.state_dict()
    optim2 = build_optimizer(torch.nn.Linear(2, 2), cfg.OPTIM)
    sched2 = build_lr_scheduler(optim2, cfg.OPTIM)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == sched.last_epoch


@pytest.mark.parametrize("kind", ["single_step", "multi_step", "constant", "linear_warmup"])
def test_other_schedules(kind):
    cfg = full_cfg()
    cfg.OPTIM.LR, cfg.OPTIM.MAX_EPOCH = 1.0, 6
    if kind == "single_step":
        cfg.OPTIM.LR_SCHEDULER, cfg.OPTIM.STEPSIZE, cfg.OPTIM.GAMMA = "single_step", (2,), 0.5
        expected = [1, 1, 0.5, 0.5, 0.25, 0.25]
    elif kind == "multi_step":
        cfg.OPTIM.LR_SCHEDULER, cfg.OPTIM.STEPSIZE, cfg.OPTIM.GAMMA = "multi_step", (1, 4), 0.1
        expected = [1, 0.1, 0.1, 0.1, 0.01, 0.01]
    elif kind == "constant":
        cfg.OPTIM.LR_SCHEDULER = "constant"
        expected = [1] * 6
    else:
        cfg.OPTIM.update({"LR_SCHEDULER": "constant", "WARMUP_EPOCH": 2, "WARMUP_TYPE": "linear", "WARMUP_MIN_LR": 0.1})
        expected = [0.1, 0.5, 1, 1, 1, 1]
    optim = build_optimizer(torch.nn.Linear(2, 2), cfg.OPTIM)
    sched = build_lr_scheduler(optim, cfg.OPTIM)
    lrs = []
    for _ in range(6):
        lrs.append(optim.param_groups[0]["lr"])
        optim.step()
        sched.step()
    assert lrs == pytest.approx(expected)


def test_evaluator_matches_scikit_learn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    cfg = full_cfg()
    cfg.TEST.PER_CLASS_RESULT = True
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    pred = np.where(rng.random(200) < 0.6, y, rng.integers(0, 4, 200))
    ev = build_evaluator(cfg, lab2cname={0: "a", 1: "b", 2: "c", 3: "d"})
    for start in range(0, 200, 64):
        logits = torch.nn.functional.one_hot(torch.tensor(pred[start:start + 64]), 4).float()
        ev.process(logits, torch.tensor(y[start:start + 64]))
    res = ev.evaluate()
    assert res["accuracy"] == pytest.approx(100 * accuracy_score(y, pred))
    assert res["macro_f1"] == pytest.approx(100 * f1_score(y, pred, average="macro"))
    assert np.array_equal(ev.cmat, confusion_matrix(y, pred))
    assert res["per_class_accuracy"]["a"] == pytest.approx(100 * np.mean(pred[y == 0] == 0))


def items(n_classes=3, per_class=10, root="/data/x"):
    return [Datum(f"{root}/c{c}/{i}.png", c, 0, f"class{c}") for c in range(n_classes) for i in range(per_class)]


def test_fewshot_sampling_is_per_seed_and_cached_as_relative_json(tmp_path):
    ds = DatasetBase(train_x=items(), test=items())
    a = ds.generate_fewshot_dataset(items(), num_shots=4, seed=1)
    b = ds.generate_fewshot_dataset(items(), num_shots=4, seed=1)
    c = ds.generate_fewshot_dataset(items(), num_shots=4, seed=2)
    assert [d.impath for d in a] == [d.impath for d in b] != [d.impath for d in c]
    assert len(a) == 12 and all(sum(d.label == k for d in a) == 4 for k in range(3))

    train, val = items(root=str(tmp_path / "img")), items(per_class=3, root=str(tmp_path / "img"))
    cache = tmp_path / "split_fewshot" / "shot_4-seed_1.json"
    image_dir = str(tmp_path / "img")
    t1, v1 = load_or_sample_fewshot(ds, str(cache), train, val, 4, 1, image_dir=image_dir)
    data = json.loads(cache.read_text())
    assert all(not os.path.isabs(row[0]) for row in data["train"])
    t2, v2 = load_or_sample_fewshot(ds, str(cache), train[::-1], val, 4, 1, image_dir=image_dir)  # read back, not resampled
    assert [d.impath for d in t1] == [d.impath for d in t2]
    assert [d.label for d in v1] == [d.label for d in v2]


def test_subsample_base_new_relabels_and_warns():
    data = items(n_classes=5, per_class=2)
    base, = DatasetBase.subsample_classes(data, subsample="base")
    new, = DatasetBase.subsample_classes(data, subsample="new")
    assert sorted({d.label for d in base}) == [0, 1, 2] and {d.classname for d in base} == {"class0", "class1", "class2"}
    assert sorted({d.label for d in new}) == [0, 1] and {d.classname for d in new} == {"class3", "class4"}
    with pytest.warns(UserWarning, match="degenerate"):
        DatasetBase.subsample_classes(items(n_classes=3), subsample="base")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(str(target), {"a": 1})

    class Boom:
        pass

    with pytest.raises(TypeError):
        write_json_atomic(str(target), {"a": Boom()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
