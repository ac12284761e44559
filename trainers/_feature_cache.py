"""Features of the frozen encoders kept on disk and shared by runs.

Image features of a dataset split and text features of a list of texts depend only on
the frozen backbone, the precision, the preprocessing and the inputs, so every run
with the same of those (seeds, recipes, base/new halves, cross-modal targets) can
reuse them. A cache file is named by a digest of everything the features depend on
and holds that description again in its metadata; a file that does not match, or
cannot be read, is ignored and rewritten.

Image files hold one row per image, keyed by the image's path relative to the split
file: the base half of a split fills some rows and the new half adds the rest.
Writers merge under a file lock and replace the file atomically, so concurrent runs
never see a partial file and never lose rows that were written before them.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager

import torch

from core.utils import atomic_open, logger

FORMAT = 1


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


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _weights_file(spec):
    """The weights file a backbone spec loads from, if it is a file on disk."""
    if spec.get("weights") and os.path.isfile(spec["weights"]):
        return spec["weights"]
    if spec.get("local"):
        from pathlib import Path

        from open_clip.factory import _find_checkpoint_in_dir

        found = _find_checkpoint_in_dir(Path(spec["local"]))
        return str(found) if found else None
    if spec.get("pretrained") and os.path.isfile(str(spec["pretrained"])):
        return spec["pretrained"]
    return None


def _hub_revision(repo_id, cache_dir=None):
    """The commit of a cached hub snapshot (the folder open_clip loads from), or None."""
    from ._backbones import WEIGHT_FILES, _hf_cached

    path = _hf_cached(repo_id, WEIGHT_FILES, cache_dir)
    if not path:
        return None
    parts = os.path.normpath(path).split(os.sep)
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else sha256_file(path)


def parameter_fingerprint(model):
    """A digest of every parameter and buffer (names, shapes, values): for models with no weights file."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def memo_sha256(path, memo_dir=None):
    """sha256 of a (large) file, remembered in ``memo_dir`` by path, size and modification time."""
    if not memo_dir:
        return sha256_file(path)
    st = os.stat(path)
    name = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    memo = os.path.join(memo_dir, name)
    try:
        with open(memo, encoding="ascii") as f:
            value = f.read().strip()
        if len(value) == 64:
            return value
    except OSError:
        pass
    value = sha256_file(path)
    try:
        with atomic_open(memo, "w", encoding="ascii") as f:
            f.write(value + "\n")
    except OSError:
        pass
    return value


def backbone_identity(backbone, pretrained="", cache_dir="", memo_dir=None):
    """What makes a backbone's features what they are: a JSON-able dict.

    An ``identity`` attribute on the backbone that names its weights' sha256 is used as is. Otherwise:
    the name, plus the weights file's sha256 (local files), the hub snapshot revision
    (hub models), or for random-weight configs the config file's sha256 and the library
    versions that draw the weights.
    """
    given = getattr(backbone, "identity", None)
    if given and given.get("weights_sha256"):
        return {"identity": given}
    from ._backbones import resolve_spec

    spec = resolve_spec(backbone.name, pretrained)
    ident = {"name": backbone.name}
    weights = _weights_file(spec)
    if weights:
        ident["weights_sha256"] = memo_sha256(weights, memo_dir)
    if spec.get("config"):
        import open_clip

        ident["config_sha256"] = sha256_file(spec["config"])
        if not weights:
            ident["random_init"] = {"torch": torch.__version__, "open_clip": open_clip.__version__}
    if not weights and not spec.get("config"):
        repo = spec["hub"][len("hf-hub:"):] if spec.get("hub") else None
        if spec.get("arch"):
            import open_clip

            pcfg = open_clip.get_pretrained_cfg(spec["arch"], spec.get("pretrained") or "") or {}
            repo = (pcfg.get("hf_hub") or "").strip("/") or None
            ident["pretrained"] = spec.get("pretrained")
        revision = _hub_revision(repo, cache_dir or None) if repo else None
        if revision:
            ident["hub"], ident["revision"] = repo, revision
        else:
            ident["parameters_sha256"] = parameter_fingerprint(backbone.model)
    return ident


def digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


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
    def _read(self, path, key):
        """(features, row names) of a cache file whose key matches, else None."""
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
            if features.dim() != 2 or not isinstance(rows, list) or features.shape[0] != len(rows):
                raise ValueError(f"features {tuple(features.shape)} do not match {len(rows or [])} rows")
            if not torch.isfinite(features).all():
                raise ValueError("it holds non-finite values")
        except Exception as e:  # a partial, foreign or damaged file is rebuilt, never trusted
            logger.info(f"feature cache {path} not used ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
            return None
        return features, rows

    def _write(self, path, key, features, rows):
        from safetensors.torch import save

        data = save({"features": features.detach().float().cpu().contiguous()},
                    metadata={"key": json.dumps(key, sort_keys=True, default=str), "rows": json.dumps(rows),
                              "format": str(FORMAT)})
        try:
            with atomic_open(path, "wb") as f:
                f.write(data)
        except OSError as e:
            logger.info(f"could not write the feature cache {path} ({e}); continuing without it")

    # ---------------------------------------------------------------- images
    def image_path(self, key):
        return os.path.join(self.root, "images", f"{key['dataset']}-{key['split']}-{digest(key)[:20]}.safetensors")

    def image_features(self, key, names, encode):
        """Features (len(names), D) of the images ``names``; ``encode(indices)`` encodes the missing ones.

        Returns (features, number of images encoded now).
        """
        path = self.image_path(key)
        found = self._read(path, key)
        index = {n: i for i, n in enumerate(found[1])} if found else {}
        missing = [i for i, n in enumerate(names) if n not in index]
        if not missing:
            rows = torch.tensor([index[n] for n in names], dtype=torch.long)
            return found[0][rows], 0
        new = encode(missing).float().cpu()
        with _locked(path):
            # Another run may have added rows since: merge with what is on disk now.
            current = self._read(path, key)
            feats, stored = (current[0], list(current[1])) if current else (torch.empty(0, new.shape[1]), [])
            if feats.shape[1] != new.shape[1]:
                feats, stored = torch.empty(0, new.shape[1]), []
            have = set(stored)
            add = [j for j, i in enumerate(missing) if names[i] not in have]
            if add:
                feats = torch.cat([feats, new[add]])
                stored += [names[missing[j]] for j in add]
                self._write(path, key, feats, stored)
        out = torch.empty(len(names), new.shape[1])
        if found:
            known = [i for i, n in enumerate(names) if n in index]
            if known:
                out[known] = found[0][[index[names[i]] for i in known]]
        out[missing] = new
        return out, len(missing)

    # ---------------------------------------------------------------- texts
    def text_features(self, key, texts, encode):
        """Features (len(texts), D) of ``texts``; returns (features, hit)."""
        texts = list(texts)
        key = dict(key, texts_sha256=digest(texts))
        path = os.path.join(self.root, "texts", f"{digest(key)[:24]}.safetensors")
        found = self._read(path, key)
        if found is not None and found[1] == texts:
            return found[0], True
        feats = encode(texts)
        if texts:
            with _locked(path):
                self._write(path, key, feats, texts)
        return feats, False
