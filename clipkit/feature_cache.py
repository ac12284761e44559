"""Features of the frozen encoders kept on disk and shared by runs.

Image features of a dataset split and text features of a list of texts depend only on
the frozen backbone, the precision, the preprocessing and the inputs, so every run
with the same of those (seeds, recipes, base/new halves, cross-modal targets) can
reuse them. A cache file is named by a digest of everything the features depend on
and holds that description again in its metadata; a file that does not match, or
cannot be read, is ignored and rewritten.

Image files hold one row per image, keyed by the image's path relative to the image
folder, its size and its modification time: the base half of a split fills some rows
and the new half adds the rest, and an image changed under the same split file is a
miss that is encoded again (its old row is replaced). Every file carries a sha256 of
its rows and values; a file whose checksum, width, shape or dtype is not what it
should be is a miss, logged in one line, and rebuilt. Writers merge under a file lock
and replace the file atomically, so concurrent runs never see a partial file and
never lose rows that were written before them.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager

import torch

from core.utils import atomic_open, logger

FORMAT = 2


def resolve_cache_dir(setting, output_dir):
    """The folder of TEST.FEATURE_CACHE: '' = none, 'auto' = ``feature_cache`` in the output root.

    The output root is the top folder of OUTPUT_DIR when it lies under the working
    directory (``output/demo/run`` -> ``output/feature_cache``), else OUTPUT_DIR itself.
    """
    setting = str(setting or "").strip()
    if not setting:
        return None
    if setting != "auto":
        return os.path.abspath(os.path.expanduser(setting))
    out = os.path.abspath(output_dir or ".")
    rel = os.path.relpath(out, os.getcwd())
    if rel != "." and not rel.startswith(".."):
        return os.path.join(os.getcwd(), rel.split(os.sep)[0], "feature_cache")
    return os.path.join(out, "feature_cache")


def backbone_identity(backbone):
    """What makes a backbone's features what they are: a JSON-able dict.

    The identity the backbone was loaded with (name, weights file and its sha256, or the hub
    blob's sha256, and the architecture). Models without a weights file are random-weight
    configs drawn the same way every run by a given torch and open_clip, or open_clip
    pretrained tags whose files are not hashed: a digest of their parameters stands in.
    """
    ident = dict(backbone.identity)
    if not ident.get("weights_sha256"):
        import open_clip

        ident["random_init"] = {"torch": torch.__version__, "open_clip": open_clip.__version__}
        ident["parameters_sha256"] = parameter_fingerprint(backbone.model)
    return ident


def parameter_fingerprint(model):
    """A digest of every parameter and buffer (names, shapes, values): for models with no weights file."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def checksum(features, rows):
    """sha256 of a cache file's rows and float32 values (shape included)."""
    h = hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode())
    h.update(str(tuple(features.shape)).encode())
    h.update(features.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _row(name):
    """A row name as stored (JSON): a path, or [path, size, mtime_ns]."""
    return list(name) if isinstance(name, (list, tuple)) else name


def _row_key(name):
    return json.dumps(name) if isinstance(name, list) else name


def _row_path(name):
    return name[0] if isinstance(name, list) else name


@contextmanager
def _locked(path):
    """An exclusive lock on ``path``.lock (a no-op where file locks are unavailable)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic replacement alone keeps files whole
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class FeatureCache:
    """Keyed feature files under one folder: ``images/`` per dataset split, ``texts/`` per text list."""

    def __init__(self, root):
        self.root = root

    # ---------------------------------------------------------------- files
    def _read(self, path, key, width=None, quiet=False):
        """(features, row names) of a cache file whose key, checksum, dtype and width match, else None.

        Why a file is not used is logged in one line (``quiet``: not, when it was said already).
        """
        if not os.path.isfile(path):
            return None
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                features = f.get_tensor("features")
            rows = json.loads(meta.get("rows", "null"))
            if json.loads(meta.get("key", "null")) != key or int(meta.get("format", 0)) != FORMAT:
                raise ValueError("it was written for other inputs")
            if features.dtype != torch.float32:
                raise ValueError(f"its features are {features.dtype}, not float32")
            if features.dim() != 2 or not isinstance(rows, list) or features.shape[0] != len(rows):
                raise ValueError(f"features {tuple(features.shape)} do not match {len(rows or [])} rows")
            if width is not None and features.shape[1] != width:
                raise ValueError(f"its features are {features.shape[1]} wide, the backbone's {width}")
            if meta.get("checksum") != checksum(features, rows):
                raise ValueError("its rows or values do not match its checksum")
            if not torch.isfinite(features).all():
                raise ValueError("it holds non-finite values")
        except Exception as e:  # a partial, foreign, edited or damaged file is rebuilt, never trusted
            if not quiet:
                    logger.info(f"feature cache {path} not used, encoding again "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})")
            return None
        return features, rows

    def _write(self, path, key, features, rows):
        from safetensors.torch import save

        features = features.detach().float().cpu().contiguous()
        data = save({"features": features},
                    metadata={"key": json.dumps(key, sort_keys=True, default=str), "rows": json.dumps(rows),
                              "format": str(FORMAT), "checksum": checksum(features, rows)})
        try:
            with atomic_open(path, "wb") as f:
                f.write(data)
        except OSError as e:
            logger.info(f"could not write the feature cache {path} ({e}); continuing without it")

    # ---------------------------------------------------------------- images
    def image_path(self, key):
        return os.path.join(self.root, "images", f"{key['dataset']}-{key['split']}-{digest(key)[:20]}.safetensors")

    def image_features(self, key, names, encode, width=None):
        """Features (len(names), D) of the images ``names``; ``encode(indices)`` encodes the missing ones.

        A name is the image's relative path, or ``[path, size, mtime_ns]``: a stored row of the same
        path with another size or time is stale, encoded again and replaced. ``width``: D, when known.
        Returns (features, number of images encoded now).
        """
        names = [_row(n) for n in names]
        path = self.image_path(key)
        found = self._read(path, key, width)
        index = {_row_key(n): i for i, n in enumerate(found[1])} if found else {}
        missing = [i for i, n in enumerate(names) if _row_key(n) not in index]
        if not missing:
            rows = torch.tensor([index[_row_key(n)] for n in names], dtype=torch.long)
            return found[0][rows], 0
        new = encode(missing).float().cpu()
        with _locked(path):
            # Another run may have added rows since: merge with what is on disk now.
            current = self._read(path, key, new.shape[1], quiet=found is None)
            feats, stored = (current[0], list(current[1])) if current else (torch.empty(0, new.shape[1]), [])
            have = {_row_key(n) for n in stored}
            add = [j for j, i in enumerate(missing) if _row_key(names[i]) not in have]
            if add:
                # Rows of the same images with another size or time are stale: the new ones replace them.
                replaced = {_row_path(names[missing[j]]) for j in add}
                keep = [r for r, n in enumerate(stored) if _row_path(n) not in replaced]
                feats = torch.cat([feats[keep], new[add]])
                stored = [stored[r] for r in keep] + [names[missing[j]] for j in add]
                self._write(path, key, feats, stored)
        out = torch.empty(len(names), new.shape[1])
        if found:
            known = [i for i, n in enumerate(names) if _row_key(n) in index]
            if known:
                out[known] = found[0][[index[_row_key(names[i])] for i in known]]
        out[missing] = new
        return out, len(missing)

    # ---------------------------------------------------------------- texts
    def text_features(self, key, texts, encode, width=None):
        """Features (len(texts), D) of ``texts``; returns (features, hit)."""
        texts = list(texts)
        key = dict(key, texts_sha256=digest(texts))
        path = os.path.join(self.root, "texts", f"{digest(key)[:24]}.safetensors")
        found = self._read(path, key, width)
        if found is not None and found[1] == texts:
            return found[0], True
        feats = encode(texts)
        if texts:
            with _locked(path):
                self._write(path, key, feats, texts)
        return feats, False


def views_key(key, augmentation, views):
    """The key of image rows holding ``views`` augmented views each, side by side ((views * D) wide).

    ``augmentation`` describes the random transform and how each view's randomness is drawn; another
    augmentation or another number of views is another cache entry.
    """
    return dict(key, augmentation=augmentation, views=int(views))
