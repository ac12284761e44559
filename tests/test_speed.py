"""Threads, loader workers and decoded few-shot images: settings that make runs fit the machine."""

import pytest
import torch
from PIL import Image

import core.data as data
from core.config import get_cfg_default
from core.errors import UserError
from core.utils import SMALL_MODEL_PARAMETERS, set_threads, usable_cores


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_thread_setting_config_env_and_automatic(monkeypatch, restore_threads):
    monkeypatch.delenv("MEDPROMPTCLIP_THREADS", raising=False)
    monkeypatch.delenv("MEDPROMPTCLIP_PARALLEL_RUNS", raising=False)
    assert set_threads(0, 1000) == (1, "automatic, small backbone") and torch.get_num_threads() == 1
    n, _ = set_threads(0, SMALL_MODEL_PARAMETERS)
    assert n == usable_cores() and torch.get_num_threads() == n
    monkeypatch.setenv("MEDPROMPTCLIP_PARALLEL_RUNS", str(usable_cores() * 2))
    assert set_threads(0, SMALL_MODEL_PARAMETERS)[0] == 1  # never more threads than cores per parallel run
    monkeypatch.setenv("MEDPROMPTCLIP_THREADS", "3")
    assert set_threads(0, 1000) == (3, "MEDPROMPTCLIP_THREADS") and torch.get_num_threads() == 3
    assert set_threads(2, 1000) == (2, "NUM_THREADS")  # the config key wins
    monkeypatch.setenv("MEDPROMPTCLIP_THREADS", "many")
    with pytest.raises(UserError, match="MEDPROMPTCLIP_THREADS"):
        set_threads(0, 1000)


def test_automatic_workers_leave_a_core_and_skip_single_batches(monkeypatch):
    cfg = get_cfg_default()
    monkeypatch.delenv("MEDPROMPTCLIP_PARALLEL_RUNS", raising=False)
    assert data.num_workers_for(cfg, 1) == 0
    assert data.num_workers_for(cfg, 50) == min(8, usable_cores() - 1)
    monkeypatch.setenv("MEDPROMPTCLIP_PARALLEL_RUNS", str(usable_cores()))
    assert data.num_workers_for(cfg, 50) == 0
    cfg.DATALOADER.NUM_WORKERS = 1
    assert data.num_workers_for(cfg, 1) == 1


def test_fewshot_images_are_decoded_once_and_match_reading_each_time(tmp_path, monkeypatch):
    paths = []
    for i, size in enumerate([(90, 60), (40, 30), (64, 120)]):
        path = tmp_path / f"{i}.png"
        Image.effect_noise(size, 60 + i).convert("RGB").save(path)
        paths.append(str(path))
    items = [data.Datum(p, i, 0, f"c{i}") for i, p in enumerate(paths)]
    cfg = get_cfg_default()
    cfg.INPUT.SIZE, cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD = (32, 32), (0.5,) * 3, (0.25,) * 3
    cfg.DATASET.NUM_SHOTS, cfg.DATALOADER.NUM_WORKERS = 1, 0
    reads = []
    real_read = data.read_image
    monkeypatch.setattr(data, "read_image", lambda p, source="": reads.append(p) or real_read(p, source))
    test_tfm = data.build_transform(cfg, is_train=False)
    kept = data.DatasetWrapper(items, test_tfm, keep_decoded=(32, "bicubic"))
    assert len(reads) == 3
    for _ in range(2):
        assert all(torch.equal(kept[i]["img"], test_tfm(real_read(p))) for i, p in enumerate(paths))
    assert len(reads) == 3
    loader = data.build_data_loader(cfg, items, 2, data.build_transform(cfg, is_train=True), is_train=True)
    assert loader.dataset.decoded is not None and max(min(im.size) for im in loader.dataset.decoded) == 32
    for _ in range(2):
        assert sum(len(b["img"]) for b in loader) == 2
    assert len(reads) == 6  # three for the first wrapper, three for the loader's, none per epoch
