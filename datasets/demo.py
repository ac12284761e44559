"""The synthetic demo benchmark, drawn on first use under ``DATASET.ROOT/demo``.

Three imaging styles (a fundus-like disc, a grayscale radiograph, a stained
tissue section), each with four findings: spots, a ring, streaks and a blob.
A finding is drawn at a random visibility, from faint to clear, over a noisy
background, so some images are hard to read and accuracy has room to move.
Half of the classes are named by what they show ("fundus_spots"); the other
half carry code-like names ("K7") that say nothing about the image, the way
an eponym or a rare syndrome name does. ``llm_descriptions/demo.json``
describes what every class looks like, so for a code-named class only its
descriptions say what to look for. Each image is drawn from its own seed, so
the data are the same on every machine.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from core.utils import logger, remove_stale_temp_files, temp_prefix, write_json_atomic

from .catalog import DEMO

IMAGE_SIZE = 64
# Images per class in each split. More training images than the usual 16 shots, so the
# few-shot subset differs from seed to seed; 30 test images per class resolve accuracy to ~0.6%.
SPLIT_SIZES = {"train": 40, "val": 8, "test": 30}

# What each class shows: (imaging style, finding). Code-named classes are spread so that
# the base half (first six labels) and the new half each hold one per style.
CLASS_LOOKS = {
    "Z5": ("fundus", "streaks"), "J2": ("xray", "blob"), "W4": ("tissue", "spots"),
    "fundus_ring": ("fundus", "ring"), "xray_streaks": ("xray", "streaks"), "tissue_blob": ("tissue", "blob"),
    "fundus_spots": ("fundus", "spots"), "xray_ring": ("xray", "ring"), "Q3": ("tissue", "streaks"),
    "K7": ("fundus", "blob"), "V9": ("xray", "spots"), "tissue_ring": ("tissue", "ring"),
}
# Visibility of a finding: the opacity it is blended in with, drawn per image.
VISIBILITY = (0.2, 1.0)
# Standard deviation of the pixel noise added to every image (0-255 scale).
NOISE_STD = 10.0


def _jitter(rng, color, amount=18):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def _base_fundus(rng, size):
    im = Image.new("RGB", (size, size), (0, 0, 0))
    d = ImageDraw.Draw(im)
    r = size * 0.46
    c = size / 2
    d.ellipse([c - r, c - r, c + r, c + r], fill=_jitter(rng, (196, 84, 40)))
    # Optic disc and a few vessels leaving it.
    ox, oy = c + rng.uniform(-0.18, 0.18) * size, c + rng.uniform(-0.1, 0.1) * size
    od = size * 0.07
    for _ in range(4):
        angle = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.25, 0.4) * size
        d.line([ox, oy, ox + np.cos(angle) * length, oy + np.sin(angle) * length], fill=(140, 40, 25), width=1)
    d.ellipse([ox - od, oy - od, ox + od, oy + od], fill=_jitter(rng, (240, 200, 120), 10))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse([c - r, c - r, c + r, c + r], fill=255)
    return im, mask, (ox, oy)


def _base_xray(rng, size):
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = np.exp(-(((xx - 0.5) / 0.42) ** 2 + ((yy - 0.55) / 0.5) ** 2) * 2.0)
    lungs = sum(np.exp(-(((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2) * 2.5) for cx in (0.32, 0.68))
    img = 40 + 150 * body - 90 * lungs + rng.normal(0, 6, (size, size))
    for k in range(5):  # faint ribs
        y = 0.25 + 0.12 * k
        img += 14 * np.exp(-(((yy - y - 0.05 * np.sin(xx * 6)) / 0.012) ** 2))
    arr = np.clip(img, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "L").convert("RGB"), None, (size / 2, size / 2)


def _base_tissue(rng, size):
    noise = rng.normal(0, 1, (size // 4, size // 4))
    noise = np.kron(noise, np.ones((4, 4)))
    base = np.array(_jitter(rng, (236, 170, 200), 10), dtype=np.float64)
    arr = base[None, None, :] + noise[..., None] * np.array([8.0, 14.0, 10.0])
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").filter(ImageFilter.GaussianBlur(1))
    d = ImageDraw.Draw(im)
    for _ in range(8):  # sparse background nuclei
        x, y = rng.uniform(0, size, 2)
        d.ellipse([x - 1, y - 1, x + 1, y + 1], fill=(120, 60, 150))
    return im, None, (size / 2, size / 2)


# Colours of each finding per style: (spots, ring, streaks, blob).
_FINDING_COLORS = {
    "fundus": {"spots": (252, 240, 170), "ring": (250, 225, 190), "streaks": (90, 20, 15), "blob": (95, 18, 12)},
    "xray": {"spots": (235, 235, 235), "ring": (230, 230, 230), "streaks": (225, 225, 225), "blob": (240, 240, 240)},
    "tissue": {"spots": (80, 30, 120), "ring": (95, 40, 135), "streaks": (200, 60, 95), "blob": (60, 20, 95)},
}

_BASES = {"fundus": _base_fundus, "xray": _base_xray, "tissue": _base_tissue}


def _inside(rng, size, margin=0.28):
    lo, hi = size * margin, size * (1 - margin)
    return rng.uniform(lo, hi), rng.uniform(lo, hi)


def draw_image(classname, index, size=IMAGE_SIZE):
    """Draw image ``index`` of a demo class; the same arguments give the same pixels."""
    if classname not in CLASS_LOOKS:
        raise ValueError(f"unknown demo class '{classname}'; classes: {', '.join(CLASS_LOOKS)}")
    style, finding = CLASS_LOOKS[classname]
    rng = np.random.default_rng(zlib.crc32(f"{classname}/{index}".encode()))
    im, mask, anchor = _BASES[style](rng, size)
    layer = im.copy()
    d = ImageDraw.Draw(layer)
    color = _FINDING_COLORS[style][finding]
    if finding == "spots":
        for _ in range(int(rng.integers(5, 15))):
            x, y = _inside(rng, size, 0.18)
            r = rng.uniform(1.0, 2.2)
            d.ellipse([x - r, y - r, x + r, y + r], fill=_jitter(rng, color, 10))
    elif finding == "ring":
        x, y = anchor if style == "fundus" else _inside(rng, size, 0.35)
        r = rng.uniform(0.14, 0.26) * size
        d.ellipse([x - r, y - r, x + r, y + r], outline=_jitter(rng, color, 10), width=int(rng.integers(1, 4)))
    elif finding == "streaks":
        angle = rng.uniform(0, np.pi)
        for _ in range(int(rng.integers(2, 6))):
            x, y = _inside(rng, size, 0.2)
            a = angle + rng.uniform(-0.3, 0.3)
            length = rng.uniform(0.2, 0.45) * size
            dx, dy = np.cos(a) * length / 2, np.sin(a) * length / 2
            d.line([x - dx, y - dy, x + dx, y + dy], fill=_jitter(rng, color, 10), width=int(rng.integers(1, 3)))
    elif finding == "blob":
        x, y = _inside(rng, size, 0.33)
        rx, ry = rng.uniform(0.1, 0.2, 2) * size
        d.ellipse([x - rx, y - ry, x + rx, y + ry], fill=_jitter(rng, color, 10))
        layer = layer.filter(ImageFilter.GaussianBlur(0.8))
    else:
        raise ValueError(f"unknown demo finding '{finding}'")
    # A faint finding is half lost in the background, as in a real low-contrast image.
    layer = Image.blend(im, layer, float(rng.uniform(*VISIBILITY)))
    if mask is not None:
        im.paste(layer, (0, 0), mask)
    else:
        im = layer
    return _add_noise(rng, im)


def draw_background(style, rng, size=IMAGE_SIZE):
    """An image of ``style`` without any finding, with the same noise as the classes' images."""
    return _add_noise(rng, _BASES[style](rng, size)[0])


def _add_noise(rng, im):
    noisy = np.asarray(im, dtype=np.float64) + rng.normal(0, NOISE_STD, (im.height, im.width, 1))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def generate_demo(folder):
    """Write the demo's images and data_split.json to ``folder`` unless the split already exists.

    Images are drawn in a temporary folder beside ``folder`` that is renamed into
    place at the end, so an interrupted run leaves nothing half-made behind; the
    temporary folders of killed runs are removed at the next start.
    """
    split_path = os.path.join(folder, "data_split.json")
    if os.path.isfile(split_path):
        return False
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    remove_stale_temp_files(parent, depth=0)
    tmp = tempfile.mkdtemp(prefix=temp_prefix(folder), suffix=".tmp", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; the data folder gets the usual permissions
    try:
        split = {key: [] for key in SPLIT_SIZES}
        index = 0
        for label, classname in enumerate(DEMO.classnames):
            os.makedirs(os.path.join(tmp, DEMO.image_subdir, classname))
            for key, count in SPLIT_SIZES.items():
                for _ in range(count):
                    rel = f"{classname}/{index:05d}.png"
                    draw_image(classname, index).save(os.path.join(tmp, DEMO.image_subdir, rel))
                    split[key].append([rel, label, classname])
                    index += 1
        write_json_atomic(os.path.join(tmp, "data_split.json"), split, indent=None)
        if os.path.isdir(folder):
            # A folder without a split (e.g. a crashed older run): keep what it has beside our files.
            for name in os.listdir(tmp):
                target = os.path.join(folder, name)
                if not os.path.exists(target):
                    os.replace(os.path.join(tmp, name), target)
        else:
            try:
                os.replace(tmp, folder)
            except OSError:
                if not os.path.isfile(split_path):  # not a concurrent run that won the race
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(f"generated the synthetic demo dataset in {folder}")
    return True
