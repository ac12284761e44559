"""The original code's zero-shot reference: 80 ImageNet templates + the dataset template, averaged per class."""
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import DEMO_CFG, PROJECT_DIR, recipe
from clipkit.prompt_layer import PromptTokenizer

AS_PUBLISHED = recipe("ZeroShotCLIP", "as_published")


def build(demo_root, tmp_path, *opts, dataset_cfg=DEMO_CFG):
    import train
    from core.engine import TRAINER_REGISTRY

    args = train.build_parser().parse_args([
        "--root", demo_root, "--trainer", "ZeroShotCLIP", "--dataset-config-file", dataset_cfg,
        "--config-file", AS_PUBLISHED, "--output-dir", str(tmp_path / "zs"), "--eval-only",
        "MODEL.BACKBONE.NAME", "tiny-clip", "DEVICE", "cpu", "TEST.FEATURE_CACHE", "", *opts])
    return TRAINER_REGISTRY.get("ZeroShotCLIP")(train.setup_cfg(args))


def test_class_features_are_the_mean_of_81_prompts(tmp_path, demo_root):
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    trainer = build(demo_root, tmp_path)
    assert trainer.method_label() == "ZeroShotCLIP (80+1 templates)"
    bb = trainer.backbone
    tok = PromptTokenizer(bb.tokenizer, bb.context_length)
    template = trainer.dataset_entry.template
    expected = []
    for name in trainer.classnames:
        texts = [t(name.replace("_", " ")) for t in OPENAI_IMAGENET_TEMPLATES] + [template.format(name.replace("_", " "))]
        assert len(texts) == 81
        with torch.no_grad():
            feats = F.normalize(bb.model.encode_text(tok(texts)).float(), dim=-1)
        expected.append(F.normalize(feats.mean(0), dim=-1))
    expected = torch.stack(expected)
    # Unit vectors from fp32 encoders that truncate padding differently: agreement to float32 rounding.
    assert torch.allclose(trainer.text_features.cpu(), expected, atol=1e-5)
    # Not the dataset template alone.
    with torch.no_grad():
        alone = F.normalize(bb.model.encode_text(tok([template.format(n.replace("_", " "))
                                                      for n in trainer.classnames])).float(), dim=-1)
    assert not torch.allclose(trainer.text_features.cpu(), alone, atol=1e-3)


def test_recipe_rows_carry_the_originals_normalization_and_precision():
    from trainers.recipes import resolve

    nct = resolve("ZeroShotCLIP", AS_PUBLISHED, os.path.join(PROJECT_DIR, "configs", "datasets", "NCT.yaml"))
    assert list(nct.INPUT.PIXEL_MEAN) == pytest.approx([0.74060887, 0.53310455, 0.70590561])
    assert nct.TRAINER.ZEROSHOTCLIP.PREC == "fp16" and nct.TRAINER.ZEROSHOTCLIP.PROMPT == "imagenet80"
    odir = resolve("ZeroShotCLIP", AS_PUBLISHED, os.path.join(PROJECT_DIR, "configs", "datasets", "ODIR.yaml"))
    assert list(odir.INPUT.PIXEL_STD) == pytest.approx([0.26862954, 0.26130258, 0.27577711])
    demo = resolve("ZeroShotCLIP", AS_PUBLISHED, DEMO_CFG)
    assert demo.TRAINER.ZEROSHOTCLIP.PREC == "fp32" and not demo.INPUT.PIXEL_MEAN
