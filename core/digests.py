"""Content digests of the files a run reads, computed once per (path, size, mtime).

A run's identity holds the sha256 of its inputs (split file, descriptions, weights) rather than
their paths, so that changed content re-runs and a moved folder does not. A sweep plans hundreds
of runs over the same few files: digests are kept in this process and, when a sweep asks for it,
in a JSON file under its output root, so that a large weights file is read once, not once per
run or per sweep. Nothing here imports torch.
"""
from __future__ import annotations

import hashlib
import json
import os

_DIGESTS = {}  # (absolute path, size, mtime_ns) -> sha256
_store = {"path": None, "dirty": False}
# A sweep names its store here, so that its worker processes and jobs read the digests it computed.
STORE_VARIABLE = "MEDPROMPTCLIP_DIGEST_STORE"


def use_store(path):
    """Also keep digests in the JSON file ``path`` (read now, written by :func:`save_store`)."""
    _store.update(path=path, dirty=False)
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        for row in rows if isinstance(rows, list) else []:
            name, size, mtime, sha = row
            if isinstance(name, str) and isinstance(sha, str) and len(sha) == 64:
                _DIGESTS.setdefault((name, int(size), int(mtime)), sha)
    except (OSError, ValueError, TypeError):
        pass  # no store yet, or an unreadable one: digests are computed again


def save_store():
    """Write the digests of files that still exist to the store (best effort: it only saves time)."""
    path = _store["path"]
    if not path or not _store["dirty"]:
        return
    from .utils import write_json_atomic

    rows = []
    for (name, size, mtime), sha in _DIGESTS.items():
        try:
            stat = os.stat(name)
        except OSError:
            continue
        if stat.st_size == size and stat.st_mtime_ns == mtime:
            rows.append([name, size, mtime, sha])
    try:
        write_json_atomic(path, rows, indent=None)
        _store["dirty"] = False
    except OSError:
        pass


def file_sha256(path):
    """Hex sha256 of a file's bytes, or None if it is not a readable file."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    if not os.path.isfile(path):
        return None
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS and _store["path"] is None and os.environ.get(STORE_VARIABLE):
        use_store(os.environ[STORE_VARIABLE])
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
        except OSError:
            return None
        _DIGESTS[key] = digest.hexdigest()
        _store["dirty"] = True
    return _DIGESTS[key]


def folder_sha256(folder):
    """A digest of the regular files directly in ``folder`` (names and contents), hidden files left out."""
    try:
        names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    except OSError:
        return None
    parts = [(n, file_sha256(os.path.join(folder, n))) for n in names if os.path.isfile(os.path.join(folder, n))]
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()


def path_sha256(path):
    """:func:`file_sha256` of a file, :func:`folder_sha256` of a folder, None otherwise."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        return folder_sha256(path)
    return file_sha256(path)
