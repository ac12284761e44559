"""Per-dataset test transforms of the original recipes: SLO's brightness step after normalization."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PROJECT_DIR, recipe
from core.data import BrightnessEnhancement, build_transform

SLO_CFG = os.path.join(PROJECT_DIR, "configs", "datasets", "SLO.yaml")


def reference(img, alpha, beta):
    """The original's step written with numpy: a uint8 cast of x 255, then alpha * x + beta saturated."""
    with np.errstate(invalid="ignore"):
        pixels = (img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)  # as the original casts
    out = np.clip(np.rint(np.abs(alpha * pixels.astype(np.float64) + beta)), 0, 255).astype(np.uint8)
    return torch.from_numpy(out).float().permute(2, 0, 1) / 255.0


def test_brightness_matches_the_reference_on_normalized_values():
    torch.manual_seed(0)
    img = torch.randn(3, 16, 16) * 1.5  # normalized values, negative ones included
    out = BrightnessEnhancement(1.8, 40, 1.0)(img)
    assert torch.equal(out, reference(img, 1.8, 40))
    assert out.min() >= 40 / 255 - 1e-7 and out.max() <= 1.0
    assert torch.equal(BrightnessEnhancement(1.8, 40, 0.0)(img), img)


@pytest.mark.parametrize("trainer,name", [("MedPromptCLIP", "specific_modal"), ("IVLP", "medpromptclip_fewshot")])
def test_slo_rows_brighten_at_test_time(trainer, name):
    from trainers.recipes import resolve

    cfg = resolve(trainer, recipe(trainer, name), SLO_CFG).clone()
    assert "brightness_enhancement" in cfg.INPUT.TRANSFORMS
    assert (cfg.INPUT.BRIGHTNESS_ALPHA, cfg.INPUT.BRIGHTNESS_BETA, cfg.INPUT.BRIGHTNESS_P) == (1.8, 40.0, 1.0)
    cfg.defrost()
    cfg.INPUT.SIZE = (8, 8)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8))
    test = build_transform(cfg, is_train=False)
    assert isinstance(test.transforms[-1], BrightnessEnhancement)
    cfg.INPUT.TRANSFORMS = ("normalize",)
    plain = build_transform(cfg, is_train=False)(image)
    assert torch.equal(test(image), reference(plain, 1.8, 40))
    # Other datasets keep the plain test transform.
    other = resolve(trainer, recipe(trainer, name), os.path.join(PROJECT_DIR, "configs", "datasets", "FFA.yaml"))
    assert "brightness_enhancement" not in other.INPUT.TRANSFORMS
