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
# A lock is stale when its owner stopped refreshing it for this long; on the same host also as soon
# as its process is gone, or its pid belongs to another process (one started at another time).
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
    from core.utils import move_aside

    return move_aside(run.out, keep=(LOCK_FILE,))


# ---------------------------------------------------------------------------- locks


def process_start(pid):
    """When process ``pid`` started (clock ticks since boot, from /proc), or None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19])  # field 22 of proc(5), counted after the command name
    except (OSError, IndexError, ValueError):
        return None


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
                pass
            if owner.get("start") is not None and process_start(int(owner["pid"])) not in (None, owner["start"]):
                return True  # the pid was reused: a process unrelated to the lock
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
            me = {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid()),
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


def follow_parent(parent, grace_s=3.0):
    """End this worker process when the sweep's process ``parent`` is gone, also after kill -9.

    The worker is sent SIGTERM (its run stops and releases its lock, as on Ctrl-C); if it is still
    there ``grace_s`` later, it exits at once. Linux signals the death of the parent immediately
    (PR_SET_PDEATHSIG); elsewhere, a thread looks every second.
    """
    import signal

    signalled = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            signalled = ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM)) == 0  # PR_SET_PDEATHSIG

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        if not signalled or parent_died_before_prctl:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    parent_died_before_prctl = os.getppid() != parent

    threading.Thread(target=watch, daemon=True).start()


def pool_worker(index, workers, tasks, events, parent=None):
    """A worker process of local:N: executes groups from ``tasks``, reports to ``events``.

    The sweep's process decides when to stop (Ctrl-C reaches it); it then sends SIGTERM, which
    stops the worker's run like Ctrl-C would: the run's lock is released, nothing is printed.
    """
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, stop)
    follow_parent(os.getppid() if parent is None else parent)
    # The sweep's process has read every event it waits for before it stops the workers; what is left
    # in the queue is not worth hanging at exit for (the reading end may be gone).
    events.cancel_join_thread()
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
            p = ctx.Process(target=pool_worker, args=(i, workers, tasks, events, os.getpid()), daemon=True)
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


# ---------------------------------------------------------------------------- SLURM

# LAUNCHER=slurm settings: SWEEP_SLURM_<NAME>, names that srun and sbatch do not read themselves, or
# the older SLURM_<NAME> (srun, run inside each job, would also read SLURM_PARTITION and SLURM_GPUS).
SLURM_DEFAULTS = {"PARTITION": "", "TIME": "240", "GPUS": "1", "CPUS": "8", "ARRAY_PARALLELISM": "32"}
# Job states after which a job never runs again.
ENDED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}
# Pending reasons that waiting does not resolve: the job asks for what its partition (or QOS) never
# gives. Each names the settings to change.
UNSATISFIABLE = {
    "PartitionConfig": ("CPUS", "GPUS", "PARTITION"),
    "PartitionNodeLimit": ("CPUS", "GPUS", "PARTITION"),
    "BadConstraints": ("CPUS", "GPUS", "PARTITION"),
    "PartitionTimeLimit": ("TIME", "PARTITION"),
    "QOSMaxWallDurationPerJobLimit": ("TIME",),
    "QOSMaxCpuPerJobLimit": ("CPUS",),
    "QOSMaxGRESPerJob": ("GPUS",),
}
# Pending reasons of a cluster that is only busy: not worth a line.
BUSY = {"None", "Priority", "Resources", "JobArrayTaskLimit", "BeginTime", "Dependency", "QOSMaxJobsPerUserLimit",
        "QOSResourceLimit", "AssocGrpCpuLimit", "AssocGrpGRES", "AssocMaxJobsLimit", "Reservation"}
# How long a job that left the queue may take to show its runs' results (shared file systems cache).
RESULT_GRACE_S = 15.0


@dataclass
class SlurmSettings:
    partition: str  # '' for the cluster's default
    minutes: int  # time limit per job
    gpus: int  # per job
    cpus: int  # per job
    parallelism: int  # jobs of an array running at once
    names: dict  # setting -> the variable it was read from (for messages)

    def show(self, *keys):
        value = {"PARTITION": self.partition or "(default)", "TIME": f"{self.minutes} min", "GPUS": self.gpus,
                 "CPUS": self.cpus, "ARRAY_PARALLELISM": self.parallelism}
        return ", ".join(f"{self.names[k]}={value[k]}" for k in keys)


def parse_minutes(value):
    """Minutes (rounded up) from a number of minutes or SLURM's formats MM:SS, HH:MM:SS, D-HH[:MM[:SS]];
    None for anything else (SLURM's 'infinite' included)."""
    import re

    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not match:
        return None
    days, a, b, c = match.groups()
    if days is not None:
        hours, minutes, seconds = int(a), int(b or 0), int(c or 0)
    elif c is not None:
        hours, minutes, seconds = int(a), int(b), int(c)
    else:
        hours, minutes, seconds = 0, int(a), int(b or 0)
    return int(days or 0) * 1440 + hours * 60 + minutes + -(-seconds // 60)


def slurm_settings():
    """The SLURM settings from the environment; a bad value is a UserError naming its variable."""
    from core.errors import UserError

    values, names = {}, {}
    for key, default in SLURM_DEFAULTS.items():
        values[key], names[key] = default, f"SWEEP_SLURM_{key}"
        for var in (f"SWEEP_SLURM_{key}", f"SLURM_{key}"):
            if os.environ.get(var, "").strip():
                values[key], names[key] = os.environ[var].strip(), var
                break

    def whole(key, least, what):
        value = values[key]
        if not value.isdigit() or int(value) < least:
            raise UserError(f"{names[key]} must be a whole number of {what} ({least} or more), not '{value}'")
        return int(value)

    minutes = parse_minutes(values["TIME"])
    if not minutes:
        raise UserError(f"{names['TIME']} must be a time limit per job in minutes (240) or as SLURM writes it "
                        f"([D-]HH:MM:SS, e.g. 4:00:00), not '{values['TIME']}'")
    return SlurmSettings(values["PARTITION"], minutes, whole("GPUS", 0, "GPUs per job"),
                         whole("CPUS", 1, "CPU cores per job"), whole("ARRAY_PARALLELISM", 1, "jobs"), names)


def slurm_command(args, timeout=120):
    """(exit code, stdout, last line of stderr) of a SLURM command."""
    import subprocess

    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 1, "", f"{args[0]} did not answer within {timeout} s"
    except OSError as e:
        return 1, "", str(e)
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    return proc.returncode, proc.stdout, (lines[-1] if lines else f"exit code {proc.returncode}")


def gpus_of(gres):
    """GPUs a node offers, from sinfo's GRES field (e.g. 'gpu:a100:4(S:0-1)', '(null)')."""
    import re

    return sum(int(n) for n in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))


def check_slurm_cluster(cfg):
    """Stop before submitting anything if SLURM is missing or unreachable, or if no node of the partition
    can ever run a job with these settings (what sinfo can tell)."""
    import shutil

    from core.errors import UserError

    missing = [c for c in ("sbatch", "squeue", "sinfo", "scancel") if shutil.which(c) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise UserError(f"LAUNCHER=slurm needs SLURM's commands, and {', '.join(missing)} {verb} not on PATH "
                        f"here; run the sweep on a login node of the cluster, or use LAUNCHER=local")
    code, out, err = slurm_command(["sinfo", "-h", "-N", "-o", "%P|%a|%c|%G|%l"])
    if code != 0:
        raise UserError(f"LAUNCHER=slurm: sinfo cannot reach the SLURM controller ({err}); start slurmctld or ask "
                        f"the cluster's administrators; nothing was submitted")
    partitions, default = {}, None
    for line in out.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5 or not fields[2].rstrip("+").isdigit():
            continue
        name = fields[0].rstrip("*")
        if fields[0].endswith("*"):
            default = name
        partitions.setdefault(name, []).append({"up": fields[1] == "up", "cpus": int(fields[2].rstrip("+")),
                                                "gpus": gpus_of(fields[3]), "limit": parse_minutes(fields[4])})
    var = cfg.names["PARTITION"]
    known = ", ".join(sorted(partitions)) or "none"
    wanted = cfg.partition.split(",") if cfg.partition else [default] if default else []
    if not wanted:
        raise UserError(f"the cluster has no default partition: set {var} to one of {known}")
    for name in wanted:
        if name not in partitions:
            raise UserError(f"{var}={cfg.partition}: the cluster has no partition '{name}' (sinfo lists {known})")
    where = f"partition {','.join(wanted)}"
    nodes = [n for name in wanted for n in partitions[name] if n["up"]]
    if not nodes:
        raise UserError(f"{where} is not up (sinfo); choose another with {var} ({known}) or wait until it is")
    cpus, gpus = cfg.names["CPUS"], cfg.names["GPUS"]
    most_cpus = max(n["cpus"] for n in nodes)
    most_gpus = max(n["gpus"] for n in nodes)
    if cfg.cpus > most_cpus:
        raise UserError(f"{cpus}={cfg.cpus}, but the nodes of {where} have at most {most_cpus} CPU cores: "
                        f"set {cpus} to {most_cpus} or fewer (or choose a partition with {var})")
    if cfg.gpus > most_gpus:
        fix = f"set {gpus}=0 to run on CPU cores" if most_gpus == 0 else f"set {gpus} to {most_gpus} or fewer"
        raise UserError(f"{gpus}={cfg.gpus}, but the nodes of {where} have "
                        f"{'no GPUs' if most_gpus == 0 else f'at most {most_gpus} GPUs'}: {fix} "
                        f"(or choose a partition with {var})")
    if not any(n["cpus"] >= cfg.cpus and n["gpus"] >= cfg.gpus for n in nodes):
        raise UserError(f"no node of {where} has both {cfg.cpus} CPU cores and {cfg.gpus} GPUs: lower {cpus} or "
                        f"{gpus} (or choose a partition with {var})")
    limits = [n["limit"] for n in nodes]
    if None not in limits and cfg.minutes > max(limits):
        raise UserError(f"{cfg.names['TIME']}={cfg.minutes} min is above the time limit of {where} "
                        f"({max(limits)} min): lower it (or choose a partition with {var})")


def check_launcher(launcher):
    """Stop on a launcher setting that cannot work, before anything is written or submitted."""
    if launcher[0] == "slurm":
        cfg = slurm_settings()
        if os.environ.get("SUBMITIT_CLUSTER", "slurm") == "slurm":
            check_slurm_cluster(cfg)


def slurm_executor(folder, cfg):
    """A submitit executor from the SLURM settings (SUBMITIT_CLUSTER=local runs the jobs as local processes)."""
    import submitit

    cluster = os.environ.get("SUBMITIT_CLUSTER", "slurm")
    executor = submitit.AutoExecutor(folder=os.path.join(folder, "%j"), cluster=cluster)
    params = {"timeout_min": cfg.minutes, "name": "medpromptclip"}
    if cluster == "slurm":
        params.update(slurm_gpus_per_node=cfg.gpus, slurm_cpus_per_task=cfg.cpus,
                      slurm_array_parallelism=cfg.parallelism, slurm_stderr_to_stdout=True)
        if cfg.partition:
            params["slurm_partition"] = cfg.partition
    executor.update_parameters(**params)
    return executor


@contextlib.contextmanager
def without_srun_variables():
    """Submit without the older SLURM_<NAME> settings in the environment: jobs inherit it, and srun in
    them would read SLURM_PARTITION and SLURM_GPUS as its own options."""
    saved = {f"SLURM_{k}": os.environ.pop(f"SLURM_{k}") for k in SLURM_DEFAULTS if f"SLURM_{k}" in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def sbatch_refusal(error, cfg):
    """One line from a failed submission: sbatch's own message and the settings it concerns."""
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if "error:" in line]
    message = lines[-1] if lines else (text.strip().splitlines() or [type(error).__name__])[-1]
    message = message.split("error:", 1)[-1].strip() if "error:" in message else message
    lower = message.lower()
    if "partition" in lower:
        keys = ("PARTITION",)
    elif "gres" in lower or "gpu" in lower:
        keys = ("GPUS", "PARTITION")
    elif "time limit" in lower:
        keys = ("TIME", "PARTITION")
    elif "cpu" in lower or "node configuration" in lower:
        keys = ("CPUS", "GPUS", "PARTITION")
    else:
        keys = tuple(SLURM_DEFAULTS)
    # sbatch also takes options from SBATCH_* variables: name those set, they may be the cause.
    own = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("SBATCH_")]
    settings = cfg.show(*keys) + (f"; also set: {', '.join(own)}" if own else "")
    return f"sbatch refused the sweep's jobs: {message} ({settings}); nothing of this submission was queued"


def queue_states(job_ids):
    """{job id: (state, reason)} of the jobs squeue lists (ended ones stay listed for a few minutes,
    SLURM's MinJobAge); None if squeue fails."""
    ids = sorted({j.split("_")[0] for j in job_ids})
    code, out, err = slurm_command(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r"])
    if code != 0:
        return {} if "Invalid job id" in err else None
    states = {}
    for line in out.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 3:
            states[fields[0]] = (fields[1], fields[2])
    return states


class Accounting:
    """Final job states from sacct, where the cluster keeps accounting; quiet (and not asked again) where not."""

    def __init__(self):
        self.works = True

    def state(self, job_id):
        if not self.works:
            return None
        code, out, _ = slurm_command(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", job_id.split("_")[0]])
        if code != 0:
            self.works = False
            return None
        for line in out.splitlines():
            fields = line.strip().split("|")
            if len(fields) == 2 and fields[0] == job_id:
                return fields[1].split()[0]
        return None


@dataclass
class SlurmJob:
    group: Group
    job: object  # submitit's Job
    log: str  # the job's own log (its stdout and stderr)
    left_at: float = None  # when it was first seen ended with runs not done
    noted: str = ""  # the pending reason last reported

    @property
    def job_id(self):
        return str(self.job.job_id)


def submission_folder(root):
    """ROOT/.submitit/<time>-<host>-<pid>: this sweep invocation's group files, pickles and job logs."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(root, ".submitit", f"{stamp}-{socket.gethostname()}-{os.getpid()}")


def clean_submission_folder(folder, keep):
    """Remove the folder but for the files in ``keep`` (logs of failed jobs); the empty .submitit too."""
    import shutil

    keep = {os.path.abspath(k) for k in keep if os.path.exists(k)}
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        for dirpath, _, files in os.walk(folder, topdown=False):
            for name in files:
                path = os.path.abspath(os.path.join(dirpath, name))
                if path not in keep:
                    with contextlib.suppress(OSError):
                        os.remove(path)
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(folder))


def ended_message(slurm_job, run, state):
    """Why a run of an ended job has no result."""
    reason = _read_failed(run)
    if reason:
        return reason
    runs = slurm_job.group.runs
    for before in runs[:runs.index(run)]:
        if run_state(before)[0] != "done":
            return f"not run: {before.label} failed"
    return (f"SLURM job {slurm_job.job_id} ended ({state}) without writing its results; job log: {slurm_job.log}")


def launch_slurm(groups, emit, root):
    """One job per group (submitted as job arrays), each running ``sweep.py --run-group`` on its group.

    Job states come from squeue (and sacct where the cluster keeps accounting): a job that left the
    queue without its runs' results is a failed run, and a job that can never start (its partition
    cannot give what it asks for) is cancelled and reported. Group files, submitit's pickles and job
    logs live in a folder of this invocation, so sweeps sharing an output root never read each
    other's; it is removed at the end but for the logs of failed jobs, and kept while jobs still run.
    """
    from submitit.helpers import CommandFunction

    from core.errors import UserError
    from core.utils import write_json_atomic

    cfg = slurm_settings()
    real = os.environ.get("SUBMITIT_CLUSTER", "slurm") == "slurm"
    if real:
        check_slurm_cluster(cfg)
    folder = submission_folder(root)
    spec_dir = os.path.join(folder, "groups")
    executor = slurm_executor(folder, cfg)
    accounting = Accounting()
    sweep = os.path.join(PROJECT_DIR, "scripts", "sweep.py")
    finished, failed, started = set(), set(), set()
    jobs = {}  # group name -> SlurmJob still in the queue
    failed_logs = []
    squeue_failing = False

    def finish(slurm_job, state):
        del jobs[slurm_job.group.name]
        finished.add(slurm_job.group.name)
        ok = True
        for run in slurm_job.group.runs:
            if run_state(run)[0] == "done":
                emit("done", run)
            else:
                emit("failed", run, message=ended_message(slurm_job, run, state))
                ok = False
        if not ok:
            failed.add(slurm_job.group.name)
            failed_logs.append(slurm_job.log)

    try:
        while len(finished) < len(groups):
            batch = []
            for group in groups_to_start(groups, finished, started, failed, emit):
                if all(run_state(run)[0] == "done" for run in group.runs):
                    for run in group.runs:  # a finished run is never submitted again
                        emit("reused", run)
                    finished.add(group.name)
                    continue
                spec = os.path.join(spec_dir, f"{group.name}.json")
                write_json_atomic(spec, group.to_dict())
                batch.append((group, CommandFunction([sys.executable, sweep, "--run-group", spec], verbose=True)))
            if batch:
                try:
                    with without_srun_variables(), executor.batch():
                        delayed = [(group, executor.submit(fn)) for group, fn in batch]
                except Exception as e:  # sbatch refused: its message, not submitit's traceback
                    raise UserError(sbatch_refusal(e, cfg)) from None
                for group, job in delayed:
                    jobs[group.name] = SlurmJob(group, job, str(job.paths.stdout))
                    for run in group.runs:
                        emit("submitted", run, job=job.job_id)
            if not jobs:
                continue
            now = time.time()
            states = queue_states([j.job_id for j in jobs.values()]) if real else {}
            if states is None:
                if not squeue_failing:
                    emit("info", None, message="squeue fails; still waiting for the jobs (is the SLURM controller up?)")
                squeue_failing = True
                time.sleep(POLL_S)
                continue
            squeue_failing = False
            stuck = []
            for slurm_job in list(jobs.values()):
                if real:
                    state, reason = states.get(slurm_job.job_id, (None, ""))
                    if state is not None and state not in ENDED_STATES:
                        if state == "PENDING" and reason in UNSATISFIABLE:
                            stuck.append((slurm_job, reason))
                        elif state == "PENDING" and reason not in BUSY and reason != slurm_job.noted:
                            emit("info", None, message=f"SLURM job {slurm_job.job_id} is pending: {reason}")
                            slurm_job.noted = reason
                        continue
                    state = (state or accounting.state(slurm_job.job_id)
                             or "it left the queue; no accounting to tell its state")
                else:
                    if not slurm_job.job.done():
                        continue
                    state = "ended"
                runs = slurm_job.group.runs
                if not (all(run_state(r)[0] == "done" for r in runs) or any(_read_failed(r) for r in runs)):
                    # Results may show on this host's file system a little after the job ended.
                    slurm_job.left_at = slurm_job.left_at or now
                    if now - slurm_job.left_at < RESULT_GRACE_S:
                        continue
                finish(slurm_job, state)
            if stuck:
                slurm_command(["scancel", *[j.job_id for j, _ in stuck]])
                for slurm_job, reason in stuck:
                    message = (f"SLURM job {slurm_job.job_id} can never start: it is pending for {reason} "
                               f"({cfg.show(*UNSATISFIABLE[reason])}); change "
                               f"{' or '.join(cfg.names[k] for k in UNSATISFIABLE[reason])} and rerun "
                               f"(the job was cancelled)")
                    del jobs[slurm_job.group.name]
                    finished.add(slurm_job.group.name)
                    failed.add(slurm_job.group.name)
                    for run in slurm_job.group.runs:
                        emit("failed", run, message=message)
            if jobs and len(finished) < len(groups):
                time.sleep(POLL_S)
    finally:
        if jobs:
            ids = " ".join(sorted(j.job_id for j in jobs.values()))
            emit("info", None, message=f"the sweep's {len(jobs)} SLURM job(s) keep running (rerun the sweep to wait "
                                       f"for them again: finished runs are reused); to stop them: scancel {ids}")
        else:
            clean_submission_folder(folder, failed_logs)
    return not failed


def _read_failed(run):
    try:
        with open(os.path.join(run.out, FAILED_FILE), encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""
