"""Logging, seeding, atomic file writes and the one place devices are resolved.

torch and numpy are imported where used, so that commands which only read files start at once.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager

from .errors import UserError

logger = logging.getLogger("medpromptclip")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (it may be replaced, e.g. by test capture)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


class _FileHandler(logging.FileHandler):
    """A log file whose write errors (disk full) stop the run instead of printing a traceback and going on."""

    def handleError(self, record):
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            if error.filename is None:
                error.filename = self.baseFilename
            raise error
        super().handleError(record)


def setup_logger(output_dir=None, filename="log.txt"):
    """Log to stdout, and to ``output_dir/filename`` when a folder is given."""
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    stream = _StdoutHandler()
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        fh = _FileHandler(os.path.join(output_dir, filename), mode="a", encoding="utf-8")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


def set_random_seed(seed):
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name):
    """Turn the DEVICE setting (auto, cpu, cuda, cuda:N) into a torch.device."""
    import torch

    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"DEVICE is '{name}' but no CUDA device is available; set DEVICE cpu or auto")
        index = name.split(":", 1)[1] if ":" in name else "0"
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise UserError(
                f"DEVICE '{name}' does not exist ({torch.cuda.device_count()} CUDA device(s)); use cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
        return torch.device(f"cuda:{index}")
    raise UserError(f"DEVICE must be auto, cpu, cuda or cuda:N, not '{name}'")


def _host_tag():
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


# Temporary files are named .<target>.<host>.<pid>.<random>.tmp, so a later run can tell
# those of a killed process (same host, pid gone) from those of a live one.
_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_stale_temp(name):
    """Whether ``name`` is a temporary file or folder of a process of this host that no longer runs."""
    match = _TEMP_NAME.match(name)
    return bool(match) and match["host"] == _host_tag() and not _pid_alive(int(match["pid"]))


def temp_prefix(target):
    """Prefix for a temporary file or folder standing in for ``target`` (see :func:`is_stale_temp`)."""
    return f".{os.path.basename(target)}.{_host_tag()}.{os.getpid()}."


def remove_stale_temp_files(folder, depth=2):
    """Delete what killed runs left of their atomic writes in ``folder`` (and subfolders up to ``depth``)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if is_stale_temp(entry.name):
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.remove(entry.path)
            except OSError:
                pass
        elif depth > 0 and entry.is_dir(follow_symlinks=False):
            remove_stale_temp_files(entry.path, depth - 1)


# Errors of a folder that cannot be written to: read-only, full, over quota, not a folder.
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOTDIR,
                errno.EEXIST, errno.EISDIR}


def write_error_message(error):
    """One line for an OSError of a folder that cannot be written: what, where, how to fix."""
    where = error.filename or "the output folder"
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free disk space (or quota) there, or choose another folder"
    else:
        fix = "make the folder writable, or choose another one"
    return f"{error.strerror or error}: {where}; {fix}"


@contextmanager
def atomic_open(path, mode="w", **kwargs):
    """Open a temporary file beside ``path``; it replaces ``path`` only if the block succeeds."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=directory)
    except OSError as e:
        e.filename = path  # name the file the user asked for, not the temporary one
        raise
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename in (None, tmp):
            e.filename = path
        raise


def write_json_atomic(path, obj, indent=2):
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")


def save_torch_atomic(obj, path):
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def read_json(path, what="file"):
    """Read JSON, turning a missing or malformed file into a one-line UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix or regenerate it") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text; fix or regenerate it") from None


def count_parameters(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def usable_cores():
    """CPU cores this process may run on (affinity and a cgroup CPU quota respected)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def cores_per_run():
    """The cores one run may use: usable cores shared among MEDPROMPTCLIP_PARALLEL_RUNS runs side by side."""
    try:
        parallel = max(1, int(os.environ.get("MEDPROMPTCLIP_PARALLEL_RUNS", "1")))
    except ValueError:
        raise UserError("MEDPROMPTCLIP_PARALLEL_RUNS must be a whole number of runs") from None
    return max(1, usable_cores() // parallel)


# Backbones below this many parameters (test-sized and demo models) run on one thread: their
# operations are too small to split, and extra threads only contend with other jobs.
SMALL_MODEL_PARAMETERS = 20_000_000


def set_threads(setting, num_parameters):
    """Set torch's CPU threads from NUM_THREADS (0 = MEDPROMPTCLIP_THREADS or automatic); return (n, why)."""
    n, why = int(setting), "NUM_THREADS"
    if n < 0:
        raise UserError(f"NUM_THREADS must be 0 (automatic) or more, not {n}")
    if n == 0 and os.environ.get("MEDPROMPTCLIP_THREADS", "").strip():
        try:
            n, why = int(os.environ["MEDPROMPTCLIP_THREADS"]), "MEDPROMPTCLIP_THREADS"
        except ValueError:
            raise UserError("MEDPROMPTCLIP_THREADS must be a whole number of threads") from None
        if n < 1:
            raise UserError(f"MEDPROMPTCLIP_THREADS must be 1 or more, not {n}")
    if n == 0:
        if num_parameters < SMALL_MODEL_PARAMETERS:
            n, why = 1, "automatic, small backbone"
        else:
            n, why = cores_per_run(), "automatic, cores per run"
    import torch

    torch.set_num_threads(n)
    return n, why


def progress(iterable, desc, total=None, min_total=1, **kwargs):
    """A tqdm bar on stderr when it is a terminal and there are at least ``min_total`` steps.

    TQDM_DISABLE=1 turns every bar off.
    """
    from tqdm import tqdm

    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    disable = None if total is None or total >= min_total else True
    return tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True, leave=False, **kwargs)


def move_aside(folder, keep=()):
    """Move what ``folder`` holds (but the names in ``keep``) into ``<folder>.replaced-<time>``; return that folder."""
    import datetime

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = f"{folder.rstrip(os.sep)}.replaced-{stamp}"
    os.makedirs(target, exist_ok=True)
    for name in os.listdir(folder):
        if name not in keep:
            os.replace(os.path.join(folder, name), os.path.join(target, name))
    return target
