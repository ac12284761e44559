"""The new trainers' recipes resolve to the published values of BiomedCoOp's benchmark, row by row."""
import os

import pytest

from conftest import PROJECT_DIR
from datasets.catalog import BIOMEDCOOP
from trainers.recipes import recipe_file, resolve

SUITE = [e.name for e in BIOMEDCOOP]

# configs/trainers/BiomedCoOp/{few_shot,base_to_novel}/<dataset>.yaml of the original: SCCM_LAMBDA, KDSP_LAMBDA, TAU.
BIOMEDCOOP_FEWSHOT = {
    "BTMRI": (0.5, 0.25, 1.5), "BUSI": (0.75, 0.75, 1.5), "CHMNIST": (0.25, 0.25, 1.5),
    "COVID_19_BiomedCoOp": (0.5, 2.0, 1.5), "CTKidney": (1.0, 0.5, 1.5), "DermaMNIST": (5.0, 20.0, 1.5),
    "KneeXray": (5.0, 20.0, 1.75), "Kvasir": (0.75, 0.75, 1.5), "LungColon": (0.5, 0.5, 1.5),
    "OCTMNIST": (1.0, 0.75, 1.5), "RETINA": (0.25, 0.25, 1.5),
}
BIOMEDCOOP_BASE2NEW = {
    "BTMRI": (0.5, 0.5, 1.25), "CHMNIST": (10.0, 1.0, 1.5), "COVID_19_BiomedCoOp": (20.0, 1.0, 1.25),
    "CTKidney": (10.0, 0.25, 1.25), "DermaMNIST": (2.0, 0.5, 1.5), "KneeXray": (0.25, 3.0, 1.25),
    "Kvasir": (1.0, 1.0, 1.25), "LungColon": (0.25, 0.75, 1.25), "OCTMNIST": (0.75, 0.5, 1.5), "RETINA": (5.0, 1.0, 2.0),
}
# Published few-shot KgCoOp W and ProGrad T per dataset.
KGCOOP_W = dict(zip(SUITE, [2.0, 10.0, 1.0, 1.0, 8.0, 8.0, 4.0, 6.0, 8.0, 1.0, 1.0]))
PROGRAD_T = dict(zip(SUITE, [2.0, 0.25, 1.0, 1.0, 1.0, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0]))


def cfg(trainer, protocol, dataset):
    ds = os.path.join(PROJECT_DIR, "configs", "datasets", f"{dataset}.yaml")
    return resolve(trainer, recipe_file(trainer, protocol, dataset), ds)


def schedule(c):
    o = c.OPTIM
    return (o.NAME, o.LR, o.MAX_EPOCH, c.DATALOADER.TRAIN_X.BATCH_SIZE, o.LR_SCHEDULER, o.WARMUP_EPOCH, o.WARMUP_CONS_LR,
            tuple(c.INPUT.TRANSFORMS))


@pytest.mark.parametrize("dataset", SUITE)
def test_biomedcoop_rows(dataset):
    c = cfg("BiomedCoOp", "fewshot", dataset)
    t = c.TRAINER.BIOMEDCOOP
    assert (t.SCCM_LAMBDA, t.KDSP_LAMBDA, t.TAU) == BIOMEDCOOP_FEWSHOT[dataset]
    assert (t.N_CTX, t.CTX_INIT, t.N_PROMPTS, t.TEXT_DROPOUT) == (4, "a photo of a", 50, False)
    rrc = ("random_resized_crop", "normalize")
    assert schedule(c) == ("sgd", 0.0025, 100, 4, "cosine", 1, 1e-5, rrc)
    if dataset in BIOMEDCOOP_BASE2NEW:
        b = cfg("BiomedCoOp", "base2new", dataset)
        t = b.TRAINER.BIOMEDCOOP
        assert (t.SCCM_LAMBDA, t.KDSP_LAMBDA, t.TAU) == BIOMEDCOOP_BASE2NEW[dataset]
        assert schedule(b) == ("sgd", 0.0025, 50, 4, "cosine", 1, 1e-5, rrc)


@pytest.mark.parametrize("dataset", SUITE)
def test_kgcoop_and_prograd_rows(dataset):
    rrc = ("random_resized_crop", "normalize")
    k = cfg("KgCoOp", "fewshot", dataset)
    # Half the published W: the published 1 - cos is half the squared distance between unit vectors.
    assert k.TRAINER.KGCOOP.W == KGCOOP_W[dataset] / 2
    assert schedule(k) == ("sgd", 0.002, 100, 128, "cosine", 1, 1e-5, rrc)
    assert cfg("KgCoOp", "base2new", dataset).TRAINER.KGCOOP.W == 8.0 / 2
    p = cfg("ProGrad", "fewshot", dataset)
    assert (p.TRAINER.PROGRAD.T, p.TRAINER.PROGRAD.LAMBDA, p.TRAINER.PROGRAD.TEACHER) == (PROGRAD_T[dataset], 1.0, "zero-shot")
    assert schedule(p) == ("sgd", 0.002, 100, 128, "cosine", 1, 1e-5, rrc)
    b = cfg("ProGrad", "base2new", dataset)
    assert schedule(b) == ("sgd", 0.0015, 50, 128, "cosine", 1, 1e-5, rrc) and b.TRAINER.PROGRAD.T == 1.0


def test_the_suite_zero_shot_prompt_is_the_originals():
    assert {e.template for e in BIOMEDCOOP} == {"a photo of a {}."}
