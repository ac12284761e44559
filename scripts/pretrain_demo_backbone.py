#!/usr/bin/env python
"""Pretrain the ``demo-clip`` backbone on synthetic image-caption pairs from the demo world.

The architecture is ``configs/backbones/demo-clip.json``, built by the project's
backbone factory (``open_clip.create_model``). Every step draws fresh images
with the demo's own drawing code, at indices from ``FIRST_INDEX`` on (the demo
dataset uses the first few hundred), so no pretraining image equals a dataset
image. Each image is paired with a generated caption that describes what was
drawn (imaging style, finding, colour) in varied words. A descriptive class
name ("fundus spots", "xray ring", ...) appears in some captions; a code-like
class name ("K7") in a few, the way a rare syndrome name turns up in few
figure captions, so the backbone knows such a name only vaguely while the
words of its descriptions are well known. Training is CLIP's:
symmetric InfoNCE with a learnable logit scale. The same ``--seed`` and
``--threads`` give bit-identical weights, written atomically as safetensors
that ``open_clip.create_model(arch, pretrained=<file>)`` loads.

    python scripts/pretrain_demo_backbone.py           # 43 minutes on 2 CPU cores shared with ~10 busy processes
    python scripts/pretrain_demo_backbone.py --eval    # also print zero-shot accuracy on the demo test split

The model trains in one torch thread while a second process draws the images:
for a model this small a second torch thread gains about a tenth when the
cores are idle and makes training several times slower when they are busy.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save as safetensors_bytes  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from core.utils import atomic_open, read_json  # noqa: E402
from datasets.catalog import DEMO, readable_classname  # noqa: E402
from datasets.demo import CLASS_LOOKS, IMAGE_SIZE, draw_background, draw_image, generate_demo  # noqa: E402
from clipkit.backbones import BACKBONE_CONFIG_DIR, _build_from_config  # noqa: E402
from clipkit.descriptions import load_descriptions  # noqa: E402

DEFAULT_CONFIG = os.path.join(BACKBONE_CONFIG_DIR, "demo-clip.json")
DEFAULT_OUT = os.path.join(BACKBONE_CONFIG_DIR, "demo-clip", "demo-clip.safetensors")
# The demo dataset draws indices 0..935; pretraining starts far above them, one block of
# indices per seed, so pretraining never sees a dataset image.
FIRST_INDEX = 1_000_000
SEED_STRIDE = 100_000_000
# Fraction of images drawn without any finding, captioned as such.
NO_FINDING_RATE = 0.1
# Fraction of captions that carry the class name: a descriptive one ("fundus spots"), a code ("K7").
CLASS_NAME_RATE = 0.3
CODE_NAME_RATE = 0.03
# Fractions of captions that name the finding's colour, the background, and the imaging style:
# captions, like real ones, leave things out.
COLOUR_RATE = 0.75
BACKGROUND_RATE = 0.3
STYLE_RATE = 0.85

WEIGHT_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}

STYLES = ("fundus", "xray", "tissue")
FINDINGS = ("spots", "ring", "streaks", "blob")

# Caption vocabulary: what a reader of the drawn image could call each part of it.
STYLE_WORDS = {
    "fundus": ["a fundus photo", "a retinal photo", "a retina photo", "a fundus image", "a retinal image",
               "a fundus photograph", "a photo of the retina"],
    "xray": ["an x-ray", "a radiograph", "a chest film", "a chest x-ray", "an xray image", "a chest radiograph"],
    "tissue": ["a tissue section", "a stained section", "a histology slide", "a tissue slide", "stained tissue",
               "a histology image"],
}
BACKGROUND_WORDS = {
    "fundus": ["on the orange retina", "on an orange disc", "near the optic disc", "on the red-orange fundus"],
    "xray": ["over the lungs", "on the gray chest", "across the body", "over dark lung fields"],
    "tissue": ["on pink tissue", "on the mottled pink background", "in the pink section", "across the stain"],
}
FINDING_WORDS = {
    "spots": ["spots", "dots", "specks", "round spots"],
    "ring": ["ring", "circle", "annulus", "ring outline", "hollow circle"],
    "streaks": ["streaks", "lines", "stripes", "line segments"],
    "blob": ["blob", "mass", "patch", "oval patch"],
}
FINDING_ADJECTIVES = {
    "spots": ["many", "small", "tiny", "scattered", "a dozen", "numerous", "several small"],
    "ring": ["one", "a thin", "a single", "a round", "a hollow"],
    "streaks": ["a few", "thin", "straight", "parallel", "several", "roughly parallel"],
    "blob": ["one", "a large", "a big", "a solid", "a single", "a soft"],
}
# Colours follow what datasets/demo.py paints for each style and finding.
COLOUR_WORDS = {
    ("fundus", "spots"): ["yellow", "pale yellow", "bright", "cream", "yellow-white", "pale"],
    ("fundus", "ring"): ["pale", "cream", "light", "pale cream"],
    ("fundus", "streaks"): ["dark red", "dark", "maroon"],
    ("fundus", "blob"): ["dark red", "dark", "maroon", "deep red"],
    ("tissue", "spots"): ["dark purple", "purple", "violet"],
    ("tissue", "ring"): ["purple", "violet", "dark purple"],
    ("tissue", "streaks"): ["red", "pink", "crimson", "red-pink", "dark pink"],
    ("tissue", "blob"): ["dark purple", "purple", "deep purple"],
    **{("xray", finding): ["white", "bright", "bright white"] for finding in FINDINGS},
}
NO_FINDING_WORDS = ["{style} with no lesion", "{style}, nothing abnormal", "{style} without findings",
                    "{style} with no spots, ring or mass", "{style}, clear and normal"]
CLASS_NAME_FRAMES = ["{name}.", "an image of {name}.", "{name}: {caption}", "{caption}, {name}.",
                     "a case of {name}.", "{name}, {caption}"]


def finding_phrase(rng, style, finding):
    """Words for one drawn finding, e.g. 'a few thin dark red streaks on the orange retina'."""
    words = [rng.choice(FINDING_ADJECTIVES[finding])]
    if rng.random() < COLOUR_RATE:
        words.append(rng.choice(COLOUR_WORDS[(style, finding)]))
    words.append(rng.choice(FINDING_WORDS[finding]))
    if rng.random() < BACKGROUND_RATE:
        words.append(rng.choice(BACKGROUND_WORDS[style]))
    return " ".join(words)


def is_code_name(classname):
    """A demo class name that says nothing about the image (e.g. 'K7')."""
    return classname != "_".join(CLASS_LOOKS[classname])


def make_caption(rng, style, finding, classname=None):
    """A caption of an image of ``style`` showing ``finding`` (None: no finding) of class ``classname``."""
    style_words = rng.choice(STYLE_WORDS[style])
    if finding is None:
        return rng.choice(NO_FINDING_WORDS).format(style=style_words) + "."
    phrase = finding_phrase(rng, style, finding)
    if rng.random() < STYLE_RATE:
        caption = rng.choice([
            f"{style_words} with {phrase}.", f"{phrase} in {style_words}.", f"{style_words} showing {phrase}.",
            f"{style_words}: {phrase}.",
        ])
    else:
        caption = phrase + "."
    if rng.random() < (CODE_NAME_RATE if is_code_name(classname) else CLASS_NAME_RATE):
        name = readable_classname(classname)
        caption = rng.choice(CLASS_NAME_FRAMES).format(name=name, caption=caption.rstrip("."))
        caption = caption if caption.endswith(".") else caption + "."
    return caption


def draw_pair(rng, seed, number):
    """Image ``number`` of the pretraining stream and its caption."""
    index = FIRST_INDEX + seed * SEED_STRIDE + number
    if rng.random() < NO_FINDING_RATE:
        style = rng.choice(STYLES)
        image = draw_background(style, np.random.default_rng([seed, number]), IMAGE_SIZE)
        return image, make_caption(rng, style, None)
    classname = rng.choice(sorted(CLASS_LOOKS))
    style, finding = CLASS_LOOKS[classname]
    return draw_image(classname, index), make_caption(rng, style, finding, classname)


def image_transform(model):
    """The evaluation transform of the trainers (core/data.py): resize, center crop, normalize."""
    pp = model.visual.preprocess_cfg
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
        T.Normalize(mean=list(pp["mean"]), std=list(pp["std"])),
    ])


def tokenize(tokenizer, texts):
    """Token ids (n, L) with the all-padding columns at the end dropped.

    The text tower masks padding, so dropping trailing padding changes no
    output and makes a step several times cheaper than the full 77 columns.
    """
    ids = tokenizer(texts)
    used = int((ids != 0).sum(1).max())
    return ids[:, :used]


def clip_loss(image_features, text_features, logit_scale):
    """Symmetric InfoNCE of matching rows of (n, D) image and text features."""
    logits = logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t()
    target = torch.arange(len(logits))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def param_groups(model, weight_decay):
    """Weight decay on matrices except the text tower's embedding tables; biases, norms and logit scale undecayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embeddings" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step, steps, base_lr, warmup):
    """Learning rate of ``step``: linear warm-up over ``warmup`` steps, then cosine decay to zero."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * progress))


def save_weights(model, path, dtype):
    """Write the state dict as safetensors in ``dtype``; ``path`` is replaced only once complete."""
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    with atomic_open(path, "wb") as f:
        f.write(safetensors_bytes(state))


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, transform, class_texts, images, labels):
    """Top-1 accuracy (%) of classifying images by the mean feature of each class's texts."""
    model.eval()
    class_features = []
    for texts in class_texts:
        feats = F.normalize(model.encode_text(tokenize(tokenizer, texts)), dim=-1)
        class_features.append(F.normalize(feats.mean(0), dim=-1))
    image_features = F.normalize(model.encode_image(torch.stack([transform(im) for im in images])), dim=-1)
    pred = (image_features @ torch.stack(class_features).t()).argmax(1)
    return 100.0 * (pred == torch.tensor(labels)).float().mean().item()


def evaluate(model, tokenizer, transform):
    """Zero-shot accuracy on the demo test split (all, base, new classes), by template prompt and by descriptions."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, DEMO.dataset_dir)
        generate_demo(folder)
        test = read_json(os.path.join(folder, "data_split.json"))["test"]
        images = [Image.open(os.path.join(folder, DEMO.image_subdir, rel)).convert("RGB") for rel, _, _ in test]
    labels = [label for _, label, _ in test]
    classnames = list(DEMO.classnames)
    half = len(classnames) // 2
    templates = [[DEMO.template.format(readable_classname(c))] for c in classnames]
    descriptions = load_descriptions(DEMO.name, classnames, os.path.join(ROOT, "llm_descriptions"))
    results = {}
    for part, keep in (("all", range(len(classnames))), ("base", range(half)), ("new", range(half, len(classnames)))):
        rows = [i for i, y in enumerate(labels) if y in keep]
        for prompts, texts in (("template", templates), ("descriptions", descriptions)):
            results[f"{prompts}_{part}"] = zero_shot_accuracy(
                model, tokenizer, transform, [texts[c] for c in keep],
                [images[i] for i in rows], [labels[i] - keep[0] for i in rows],
            )
    return results


class PairStream(torch.utils.data.IterableDataset):
    """Batches of the pretraining stream: images (batch, 3, H, W) and caption token ids (batch, L)."""

    def __init__(self, seed, steps, batch_size, transform, tokenizer):
        super().__init__()
        self.seed, self.steps, self.batch_size = seed, steps, batch_size
        self.transform, self.tokenizer = transform, tokenizer

    def __iter__(self):
        rng = random.Random(self.seed)
        for step in range(self.steps):
            pairs = [draw_pair(rng, self.seed, step * self.batch_size + i) for i in range(self.batch_size)]
            yield torch.stack([self.transform(im) for im, _ in pairs]), tokenize(self.tokenizer, [c for _, c in pairs])


def pretrain(args):
    torch.manual_seed(args.seed)
    model, tokenizer = _build_from_config("demo-clip", args.config, None, None, "cpu")
    stream = PairStream(args.seed, args.steps, args.batch_size, image_transform(model), tokenizer)
    # One worker draws the next batch while the model trains on this one: with one torch thread that
    # keeps two cores busy, and the single worker keeps the batches in their seeded order.
    batches = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)
    model.train()
    start = time.time()
    for step, (images, ids) in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        loss = clip_loss(model.encode_image(images), model.encode_text(ids), model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            # CLIP's cap: a temperature below 1/100 makes the loss unstable.
            model.logit_scale.clamp_(0, math.log(100))
        if step % args.print_freq == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f} "
                  f"logit scale {model.logit_scale.exp().item():.1f} ({time.time() - start:.0f}s)", flush=True)
    return model


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=128, help="image-caption pairs per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (linear warm-up, cosine decay)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of weight matrices")
    p.add_argument("--seed", type=int, default=1, help="seed of the images, the captions and the training")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="open_clip model config of the architecture")
    p.add_argument("--out", default=DEFAULT_OUT, help="weights file to write (.safetensors)")
    p.add_argument("--dtype", choices=sorted(WEIGHT_DTYPES), default="fp16",
                   help="dtype of the written weights (fp16 keeps the committed file under 2 MiB)")
    p.add_argument("--eval", action="store_true", help="print zero-shot accuracy on the demo test split")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the training process (a second process draws the images)")
    p.add_argument("--print-freq", type=int, default=100, help="print the loss every this many steps")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    model = pretrain(args)
    save_weights(model, args.out, WEIGHT_DTYPES[args.dtype])
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.2f} MiB) after {time.time() - start:.0f}s")
    if args.eval:
        # Evaluate what was written, loaded the way the trainers load it.
        model, tokenizer = _build_from_config("demo-clip", args.config, args.out, None, "cpu")
        for key, acc in evaluate(model, tokenizer, image_transform(model)).items():
            print(f"zero-shot {key}: {acc:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
