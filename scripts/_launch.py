"""Running a sweep's runs: reuse rules, per-run locks, and the launchers (local, local:N, slurm).

A sweep is a list of groups. A group's runs are executed in order by one process (a training run,
then the evaluation that loads it); a group may wait for other groups (``after``, e.g. stacked runs
wait for the MedPromptCLIP run they start from). Every run is executed the same way whatever the
launcher: take the run's lock, reuse its results.json if it is complete and holds the identity asked
for, otherwise (re)run train.py in the process that holds the lock, release the lock.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import io
import json
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (PROJECT_DIR, os.path.join(PROJECT_DIR, "scripts")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

LOCK_FILE = "run.lock"
FAILED_FILE = "failed.txt"
# A lock written on another host is stale when its owner stopped refreshing it for this long
# (on the same host, a lock is stale as soon as its process is gone).
STALE_AFTER_S = 600
HEARTBEAT_S = 60
# How often a process waiting for another one's run, or a driver waiting for jobs, looks again.
POLL_S = 2.0


@dataclass
class Run:
    label: str  # what the run is, for progress lines
    out: str  # its output folder
    argv: list  # train.py arguments, --output-dir first
    identity: dict = None  # the identity its results.json must hold (train.run_identity)


@dataclass
class Group:
    name: str
    runs: list
    after: list = field(default_factory=list)  # names of groups that must finish first

    def to_dict(self):
        return {"name": self.name, "runs": [asdict(r) for r in self.runs], "after": list(self.after)}

    @classmethod
    def from_dict(cls, data):
        return cls(data["name"], [Run(**r) for r in data["runs"]], list(data.get("after", [])))


# ---------------------------------------------------------------------------- state of a run


def run_state(run):
    """("done", record) | ("pending", None) | ("stale", reason): what the run's folder holds."""
    from aggregate import read_result
    from runs import identity_hash

    record, problem = read_result(run.out)
    if record is not None:
        if identity_hash(record["identity"]) == identity_hash(run.identity):
            return "done", record
        return "stale", "results.json holds a run with other settings"
    if problem and os.path.exists(os.path.join(run.out, "results.json")):
        return "stale", problem
    return "pending", None


def set_aside(run):
    """Move what a run folder holds (but its lock) into a sibling folder; return that folder."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = f"{run.out.rstrip(os.sep)}.replaced-{stamp}"
    os.makedirs(target, exist_ok=True)
    for name in os.listdir(run.out):
        if name != LOCK_FILE:
            os.replace(os.path.join(run.out, name), os.path.join(target, name))
    return target


# ---------------------------------------------------------------------------- locks


class RunLock:
    """``<run>/run.lock``: created exclusively, holding the owner's pid and host; refreshed while held."""

    def __init__(self, folder):
        self.path = os.path.join(folder, LOCK_FILE)
        self._stop = None

    def owner(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def is_stale(self, owner):
        try:
            age = time.time() - os.path.getmtime(self.path)
        except OSError:
            return False  # gone meanwhile: the next try takes it
        if not owner.get("pid"):
            return age > 30  # being written now, or left empty by a process that died while writing it
        if owner.get("host") == socket.gethostname():
            try:
                os.kill(int(owner["pid"]), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
            return False
        return age > STALE_AFTER_S

    def try_acquire(self):
        """True if this process now holds the lock, else the owner's record."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.owner()
                if not self.is_stale(owner):
                    return owner
                self._break(owner)
                continue
            me = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.datetime.now().isoformat(timespec="seconds")}
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self._stop = threading.Event()
            threading.Thread(target=self._heartbeat, args=(self._stop,), daemon=True).start()
            return True

    def _break(self, seen):
        """Remove a stale lock, unless another process replaced it meanwhile."""
        aside = f"{self.path}.stale-{socket.gethostname()}-{os.getpid()}"
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        try:
            with open(aside, encoding="utf-8") as f:
                taken = json.load(f)
        except (OSError, ValueError):
            taken = {}
        if taken != seen:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)  # a fresh lock: give it back
        os.remove(aside)

    def _heartbeat(self, stop):
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self):
        if self._stop is not None:
            self._stop.set()
            self._stop = None
            if self.owner().get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)


def lock_state(run):
    """The owner record of a live lock on the run, or None."""
    lock = RunLock(run.out)
    if not os.path.exists(lock.path):
        return None
    owner = lock.owner()
    return None if lock.is_stale(owner) else owner


# ---------------------------------------------------------------------------- executing runs


def free_memory():
    """Drop what the last run left (its trainer, cached tensors) before the next one."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_in_process(run):
    """train.py's main on the run; (ok, message). Ctrl-C inside the run is raised again here."""
    import runs
    from core.utils import setup_logger

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = runs.run(run.argv)
    except Exception as e:  # a bug, not a user mistake: keep the traceback in the run's log
        with open(os.path.join(run.out, "log.txt"), "a", encoding="utf-8") as f:
            f.write(traceback.format_exc())
        return False, f"{type(e).__name__}: {e}".splitlines()[0]
    finally:
        setup_logger()  # closes the run's log.txt
        free_memory()
    if code == 130:
        raise KeyboardInterrupt
    if code != 0:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        return False, (lines[-1].removeprefix("error: ") if lines else f"exit code {code}")
    return True, None


def execute_run(run, emit):
    """Reuse or run one run under its lock; True if it ends with a complete, matching results.json."""
    lock = RunLock(run.out)
    waiting = False
    while True:
        got = lock.try_acquire()
        if got is True:
            break
        if not waiting:
            emit("waiting", run, owner=f"pid {got.get('pid')} on {got.get('host')}")
            waiting = True
        time.sleep(POLL_S)
    try:
        state, detail = run_state(run)
        if state == "done":
            emit("reused", run)
            return True
        if state == "stale":
            emit("replaced", run, reason=detail, moved=set_aside(run))
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run.out, FAILED_FILE))
        emit("start", run)
        start = time.time()
        ok, message = train_in_process(run)
        if ok and run_state(run)[0] != "done":
            ok, message = False, "its results.json does not hold the run asked for"
        if not ok:
            with open(os.path.join(run.out, FAILED_FILE), "w", encoding="utf-8") as f:
                f.write(message + "\n")
            emit("failed", run, message=message)
            return False
        emit("done", run, seconds=time.time() - start)
        return True
    finally:
        lock.release()


def execute_group(group, emit):
    """The group's runs in order; a run after a failed one is not started. True if all succeeded."""
    failed = None
    for run in group.runs:
        if failed is not None:
            emit("failed", run, message=f"not run: {failed.label} failed")
            continue
        if not execute_run(run, emit):
            failed = run
    return failed is None


# ---------------------------------------------------------------------------- launchers


def parse_launcher(value):
    """('local', 1) | ('local', N) | ('slurm', None) from LAUNCHER."""
    from core.errors import UserError

    value = (value or "local").strip()
    if value == "local":
        return "local", 1
    if value.startswith("local:") and value[6:].isdigit() and int(value[6:]) >= 1:
        return "local", int(value[6:])
    if value == "slurm":
        return "slurm", None
    raise UserError(f"LAUNCHER must be local, local:N (N worker processes) or slurm, not '{value}'")


def ready_groups(groups, finished, started):
    """Groups not started whose dependencies have all finished."""
    return [g for g in groups if g.name not in started and all(d in finished for d in g.after)]


def blocked_by_failure(group, failed):
    return any(d in failed for d in group.after)


def groups_to_start(groups, finished, started, failed, emit):
    """The groups whose dependencies have finished, each marked started; a group that needs a failed
    one is not started but reported and counted as failed."""
    for group in ready_groups(groups, finished, started):
        started.add(group.name)
        if blocked_by_failure(group, failed):
            for run in group.runs:
                emit("failed", run, message="not run: a run it needs failed")
            finished.add(group.name)
            failed.add(group.name)
            continue
        yield group


def launch_local(groups, emit):
    """Every group in this process, in order; each backbone is loaded once."""
    from clipkit.backbones import keep_loaded_backbones

    finished, failed = set(), set()
    with keep_loaded_backbones():
        for group in groups:
            if blocked_by_failure(group, failed):
                for run in group.runs:
                    emit("failed", run, message="not run: a run it needs failed")
                ok = False
            else:
                ok = execute_group(group, emit)
            finished.add(group.name)
            if not ok:
                failed.add(group.name)
    return not failed


def _visible_gpus():
    value = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return [v for v in value.split(",") if v.strip()]


def pool_worker(index, workers, tasks, events):
    """A worker process of local:N: executes groups from ``tasks``, reports to ``events``.

    The sweep's process decides when to stop (Ctrl-C reaches it); it then sends SIGTERM, which
    stops the worker's run like Ctrl-C would: the run's lock is released, nothing is printed.
    """
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, stop)
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        # Workers share the machine's cores: more threads than that would only contend.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    from clipkit.backbones import keep_loaded_backbones

    def emit(kind, run, **extra):
        events.put((kind, asdict(run), extra))

    try:
        with keep_loaded_backbones():
            while True:
                item = tasks.get()
                if item is None:
                    return
                group = Group.from_dict(item)
                try:
                    ok = execute_group(group, emit)
                except KeyboardInterrupt:
                    return
                except Exception as e:  # report instead of dying silently
                    events.put(("crash", None, {"message": f"{type(e).__name__}: {e}"}))
                    ok = False
                events.put(("group", None, {"name": group.name, "ok": ok}))
    except KeyboardInterrupt:
        return


def launch_pool(groups, emit, workers):
    """local:N: N worker processes (spawned), each on its own GPU when several are visible."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    tasks, events = ctx.Queue(), ctx.Queue()
    gpus = _visible_gpus()
    procs = []
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    saved_parallel = os.environ.get("MEDPROMPTCLIP_PARALLEL_RUNS")
    # The workers share the machine's cores: each sizes its threads and loader workers to its part.
    os.environ.setdefault("MEDPROMPTCLIP_PARALLEL_RUNS", str(workers))
    try:
        for i in range(workers):
            if len(gpus) > 1:
                os.environ["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            p = ctx.Process(target=pool_worker, args=(i, workers, tasks, events), daemon=True)
            p.start()
            procs.append(p)
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
        if saved_parallel is None:
            os.environ.pop("MEDPROMPTCLIP_PARALLEL_RUNS", None)
    finished, failed, started = set(), set(), set()
    try:
        while len(finished) < len(groups):
            for group in groups_to_start(groups, finished, started, failed, emit):
                tasks.put(group.to_dict())
            if len(finished) == len(groups):
                break
            try:
                kind, run, extra = events.get(timeout=POLL_S)
            except Exception:  # queue.Empty: see whether the workers are still there
                dead = [p for p in procs if not p.is_alive()]
                if dead:
                    from core.errors import UserError

                    raise UserError(f"a worker process of the sweep stopped (exit code {dead[0].exitcode}); "
                                    f"rerun to resume, the runs' log.txt say where it stopped") from None
                continue
            if kind == "group":
                finished.add(extra["name"])
                if not extra["ok"]:
                    failed.add(extra["name"])
            elif kind == "crash":
                emit("crash", None, **extra)
            else:
                emit(kind, Run(**run), **extra)
        for _ in procs:
            tasks.put(None)
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()  # stops its run and releases the run's lock
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return not failed


def slurm_executor(folder):
    """A submitit executor from the SLURM_* settings (SUBMITIT_CLUSTER=local runs the jobs as local processes)."""
    import submitit

    env = os.environ
    cluster = env.get("SUBMITIT_CLUSTER", "slurm")
    executor = submitit.AutoExecutor(folder=os.path.join(folder, "%j"), cluster=cluster)
    params = {"timeout_min": int(env.get("SLURM_TIME", "240")), "name": "medpromptclip"}
    if cluster == "slurm":
        params.update(slurm_gpus_per_node=int(env.get("SLURM_GPUS", "1")),
                      slurm_cpus_per_task=int(env.get("SLURM_CPUS", "8")),
                      slurm_array_parallelism=int(env.get("SLURM_ARRAY_PARALLELISM", "32")))
        if env.get("SLURM_PARTITION"):
            params["slurm_partition"] = env["SLURM_PARTITION"]
    executor.update_parameters(**params)
    return executor


def launch_slurm(groups, emit, root):
    """One job per group (submitted as job arrays), each running ``sweep.py --run-group`` on its group."""
    from submitit.helpers import CommandFunction

    folder = os.path.join(root, ".submitit")
    spec_dir = os.path.join(folder, "groups")
    os.makedirs(spec_dir, exist_ok=True)
    from core.utils import write_json_atomic

    executor = slurm_executor(folder)
    sweep = os.path.join(PROJECT_DIR, "scripts", "sweep.py")
    finished, failed, started = set(), set(), set()
    jobs = {}
    while len(finished) < len(groups):
        batch = []
        for group in groups_to_start(groups, finished, started, failed, emit):
            spec = os.path.join(spec_dir, f"{len(started):05d}.json")
            write_json_atomic(spec, group.to_dict())
            batch.append((group, CommandFunction([sys.executable, sweep, "--run-group", spec], verbose=True)))
        if batch:
            with executor.batch():
                submitted = [(group, executor.submit(fn)) for group, fn in batch]
            for group, job in submitted:
                jobs[group.name] = (group, job)
                for run in group.runs:
                    emit("submitted", run, job=job.job_id)
        for name, (group, job) in list(jobs.items()):
            if not job.done():
                continue
            del jobs[name]
            finished.add(name)
            for run in group.runs:
                state, _ = run_state(run)
                if state == "done":
                    emit("done", run)
                else:
                    reason = _read_failed(run) or f"job {job.job_id} ended without its results"
                    emit("failed", run, message=reason)
            if any(run_state(run)[0] != "done" for run in group.runs):
                failed.add(name)
        if jobs and len(finished) < len(groups):
            time.sleep(POLL_S)
    return not failed


def _read_failed(run):
    try:
        with open(os.path.join(run.out, FAILED_FILE), encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""
