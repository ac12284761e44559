"""LAUNCHER=slurm against a real SLURM (.ci/run starts a single-node one with .ci/slurm-up.sh, first with
accounting, then without for the tests marked no_accounting); skipped with the reason where none answers."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import PROJECT_DIR

sys.path.insert(0, os.path.join(PROJECT_DIR, "scripts"))
import _launch  # noqa: E402
from core.errors import UserError  # noqa: E402

# Demo-sized jobs: one core each, no GPU, so two jobs run at once on a 2-core node.
JOB_SETTINGS = {"LAUNCHER": "slurm", "SWEEP_SLURM_CPUS": "1", "SWEEP_SLURM_GPUS": "0", "SWEEP_SLURM_TIME": "0:20:00"}
SETTINGS = [f"SWEEP_SLURM_{k}" for k in _launch.SLURM_DEFAULTS] + [f"SLURM_{k}" for k in _launch.SLURM_DEFAULTS]


def sweep_env(**env):
    base = {k: v for k, v in os.environ.items() if k not in SETTINGS and k != "SUBMITIT_CLUSTER"}
    return dict(base, HF_HUB_OFFLINE="1", PYTHON=sys.executable, **env)


def start_sweep(env):
    return subprocess.Popen(["bash", os.path.join(PROJECT_DIR, "scripts", "base2new.sh"), "demo"], cwd=PROJECT_DIR,
                            env=sweep_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_sweep(env):
    proc = start_sweep(env)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def table_of(stdout, root):
    return stdout.split("demo: base-to-new", 1)[1].replace(str(root), "ROOT")


def slurm(*args):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60)


def active_jobs():
    """Ids of the sweep's jobs still pending or running."""
    out = slurm("squeue", "-h", "-r", "-n", "medpromptclip", "-o", "%i").stdout
    return set(out.split())


def job_state(job_id):
    out = slurm("squeue", "-h", "-r", "-t", "all", "-j", job_id.split("_")[0], "-o", "%i|%T").stdout
    return dict(line.split("|") for line in out.split()).get(job_id)


@pytest.fixture(scope="session")
def cluster():
    """What the SLURM this machine reaches offers: {'partition', 'cores', 'gpus', 'accounting'}."""
    if shutil.which("sinfo") is None:
        pytest.skip("no SLURM here (sinfo not found); .ci/run starts a single-node one with .ci/slurm-up.sh")
    proc = slurm("sinfo", "-h", "-N", "-o", "%P|%c|%G|%a")
    lines = [line.split("|") for line in proc.stdout.split() if line.count("|") == 3]
    default = [fields for fields in lines if fields[0].endswith("*") and fields[3] == "up"]
    if proc.returncode != 0 or not default:
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no default partition is up"
        pytest.skip(f"no SLURM controller answers ({reason}); .ci/slurm-up.sh starts a single-node one")
    if active_jobs():
        pytest.skip("jobs named medpromptclip are already queued; these tests need the queue to themselves")
    accounting = slurm("sacct", "-n", "-X", "-o", "JobID").returncode == 0
    return {"partition": default[0][0].rstrip("*"), "cores": int(default[0][1].rstrip("+")),
            "gpus": _launch.gpus_of(default[0][2]), "accounting": accounting}


@pytest.fixture
def without_accounting(cluster):
    if cluster["accounting"]:
        pytest.skip("needs a SLURM without accounting (sacct works here); .ci/run runs it after "
                    "ACCOUNTING=0 bash .ci/slurm-up.sh")
    return cluster


def test_a_slurm_sweep_prints_the_local_table_beside_another_sweep_and_a_rerun_submits_nothing(
        tmp_path, demo_root, cluster):
    common = {"DATA": demo_root, "BACKBONE": "tiny-clip", "SEEDS": "1", "OPTS": "OPTIM.MAX_EPOCH 1"}
    shared = tmp_path / "shared"
    # Two sweeps on one output root at once (their runs differ), and the same sweep locally.
    local = start_sweep(dict(common, METHODS="ZeroShotCLIP MedPromptCLIP", OUTPUT=str(tmp_path / "local")))
    first = start_sweep(dict(common, **JOB_SETTINGS, METHODS="ZeroShotCLIP MedPromptCLIP", OUTPUT=str(shared)))
    other = start_sweep(dict(common, **JOB_SETTINGS, METHODS="CoOp", SHOTS="1", OUTPUT=str(shared)))
    (local_out, local_err), (first_out, first_err), (other_out, other_err) = (
        p.communicate(timeout=600) for p in (local, first, other))
    assert (local.returncode, first.returncode, other.returncode) == (0, 0, 0), (local_err, first_err, other_err)
    # ZeroShotCLIP's two rows (template, descriptions) and MedPromptCLIP, base and new each.
    assert first_out.count("queued ") == 6 and first_out.count("done   ") == 6 and "FAILED" not in first_out
    assert table_of(first_out, shared) == table_of(local_out, tmp_path / "local")
    assert other_out.count("queued ") == 2 and other_out.count("done   ") == 2 and "FAILED" not in other_out
    jobs = [set(re.findall(r"as job (\S+)", out)) for out in (first_out, other_out)]
    assert not jobs[0] & jobs[1]
    other_table = table_of(other_out, shared)
    assert "MedPromptCLIP" not in other_table
    (coop,) = (shared / "base2new" / "tiny-clip" / "demo").glob("shots_1/CoOp/*/seed1")
    for half in ("base", "new"):
        accuracy = json.loads((coop / half / "results.json").read_text())["accuracy"]
        assert re.search(rf"\nCoOp .*\b{accuracy:.1f}\b", other_table)
    # Each sweep removed its group files and submitit's pickles when it ended.
    assert not (shared / "base2new" / "tiny-clip" / ".submitit").exists()

    again = start_sweep(dict(common, **JOB_SETTINGS, METHODS="ZeroShotCLIP MedPromptCLIP", OUTPUT=str(shared)))
    again_out, again_err = again.communicate(timeout=600)
    assert again.returncode == 0, again_err
    assert "queued " not in again_out and again_out.count("reused ") == 6
    assert table_of(again_out, shared) == table_of(local_out, tmp_path / "local")
    assert not (shared / "base2new" / "tiny-clip" / ".submitit").exists()


@pytest.mark.no_accounting
def test_a_job_killed_with_sigkill_ends_the_sweep_with_a_failed_line_within_a_minute(
        tmp_path, demo_root, without_accounting):
    proc = start_sweep(dict(JOB_SETTINGS, DATA=demo_root, OUTPUT=str(tmp_path), BACKBONE="tiny-clip", SEEDS="1",
                            METHODS="MedPromptCLIP", OPTS="OPTIM.MAX_EPOCH 500"))
    job = None
    try:
        for line in proc.stdout:
            if line.startswith("queued "):
                job = re.search(r"as job (\S+)", line).group(1)
                break
        deadline = time.time() + 240
        while not (job_state(job) == "RUNNING" and "epoch" in _text(*tmp_path.glob(
                "base2new/tiny-clip/demo/shots_0/MedPromptCLIP/*/seed1/base/log.txt"))):
            assert time.time() < deadline and proc.poll() is None, "the job did not start training"
            time.sleep(1)
        # What an out-of-memory kill or a lost node leaves: every process of the job gone at once.
        pids = [line.split()[0] for line in slurm("scontrol", "listpids", job).stdout.splitlines()[1:]]
        killed = time.time()
        for pid in pids:
            subprocess.run(["kill", "-9", pid], capture_output=True)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            if job:
                slurm("scancel", job)
    assert time.time() - killed < 60
    assert proc.returncode == 1 and "sacct" not in out + err  # no accounting, and no warning about it
    failed = [line for line in out.splitlines() if line.startswith("FAILED MedPromptCLIP demo seed 1 train base: ")]
    assert len(failed) == 1 and f"SLURM job {job} ended (" in failed[0], out
    log = re.search(r"job log: (\S+)", failed[0]).group(1)
    assert os.path.isfile(log)  # the failed job's log is kept; its pickles and group file are not
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("groups"))
    assert "FAILED MedPromptCLIP demo seed 1 test new: not run: MedPromptCLIP demo seed 1 train base failed" in out


def _text(path=None):
    if path is None:
        return ""
    try:
        return path.read_text()
    except OSError:
        return ""


def test_unsatisfiable_cpus_are_one_line_before_anything_is_submitted(tmp_path, demo_root, cluster):
    # The older variable name still works, and the message names the one that was set.
    cores = cluster["cores"]
    code, out, err = run_sweep(dict(JOB_SETTINGS, SWEEP_SLURM_CPUS="", SLURM_CPUS=str(cores + 1), DATA=demo_root,
                                    OUTPUT=str(tmp_path / "out"), BACKBONE="tiny-clip", SEEDS="1",
                                    METHODS="ZeroShotCLIP"))
    assert code == 2 and "queued" not in out
    assert err.strip() == (f"error: SLURM_CPUS={cores + 1}, but the nodes of partition {cluster['partition']} have at "
                           f"most {cores} CPU cores: set SLURM_CPUS to {cores} or fewer (or choose a partition with "
                           f"SWEEP_SLURM_PARTITION)")
    assert not (tmp_path / "out").exists() and not active_jobs()


def test_what_sbatch_refuses_is_one_line_and_leaves_no_files(tmp_path, demo_root, cluster):
    # sbatch reads SBATCH_* variables as its own options; a feature no node has makes it refuse the jobs.
    code, out, err = run_sweep(dict(JOB_SETTINGS, SBATCH_CONSTRAINT="nosuchfeature", DATA=demo_root,
                                    OUTPUT=str(tmp_path), BACKBONE="tiny-clip", SEEDS="1", METHODS="ZeroShotCLIP"))
    assert code == 2 and "queued" not in out and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "error: sbatch refused the sweep's jobs: Batch job submission failed: Invalid feature specification "
        "(SWEEP_SLURM_PARTITION=(default), SWEEP_SLURM_TIME=20 min, SWEEP_SLURM_GPUS=0, SWEEP_SLURM_CPUS=1, "
        "SWEEP_SLURM_ARRAY_PARALLELISM=32; also set: SBATCH_CONSTRAINT=nosuchfeature); nothing of this submission "
        "was queued")
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob(".submitit")) and not active_jobs()


def test_settings_the_cluster_cannot_satisfy_are_named(monkeypatch, cluster):
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SUBMITIT_CLUSTER", raising=False)
    monkeypatch.setenv("SWEEP_SLURM_CPUS", "1")
    monkeypatch.setenv("SWEEP_SLURM_PARTITION", "nosuchpartition")
    with pytest.raises(UserError, match=r"^SWEEP_SLURM_PARTITION=nosuchpartition: the cluster has no partition "
                                        r"'nosuchpartition' \(sinfo lists .*debug"):
        _launch.check_launcher(("slurm", None))
    monkeypatch.setenv("SWEEP_SLURM_PARTITION", cluster["partition"])
    monkeypatch.setenv("SLURM_GPUS", str(cluster["gpus"] + 1))
    with pytest.raises(UserError, match=r"^SLURM_GPUS=\d+, but the nodes of partition \S+ have "
                                        r"(no GPUs: set SLURM_GPUS=0|at most \d+ GPUs)"):
        _launch.check_launcher(("slurm", None))
    monkeypatch.setenv("SLURM_GPUS", "0")
    _launch.check_launcher(("slurm", None))
    # A controller that does not answer (here: a configuration naming a port nobody listens on).
    conf = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"slurm-unreachable-{os.getpid()}.conf")
    with open(conf, "w") as f:
        f.write("ClusterName=unreachable\nSlurmctldHost=localhost\nSlurmctldPort=9\nAuthType=auth/munge\n")
    monkeypatch.setenv("SLURM_CONF", conf)
    try:
        with pytest.raises(UserError, match=r"^LAUNCHER=slurm: sinfo cannot reach the SLURM controller \(.*"
                                            r"Unable to contact slurm controller.*\); start slurmctld"):
            _launch.check_launcher(("slurm", None))
    finally:
        os.remove(conf)


def test_time_formats_and_missing_slurm_need_no_cluster(monkeypatch, tmp_path):
    assert [_launch.parse_minutes(v) for v in ("240", "1:00:00", "90:30", "1-00:00:00", "2-12", "0:0:59")] == [
        240, 60, 91, 1440, 3600, 1]
    assert _launch.parse_minutes("infinite") is None and _launch.parse_minutes("1h") is None
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_TIME", "1h")
    with pytest.raises(UserError, match=r"^SLURM_TIME must be a time limit per job in minutes \(240\) or as SLURM "
                                        r"writes it \(\[D-\]HH:MM:SS, e.g. 4:00:00\), not '1h'$"):
        _launch.check_launcher(("slurm", None))
    monkeypatch.setenv("SWEEP_SLURM_TIME", "4:00:00")  # the new name wins over the older one
    monkeypatch.setenv("SWEEP_SLURM_CPUS", "eight")
    with pytest.raises(UserError, match=r"^SWEEP_SLURM_CPUS must be a whole number of CPU cores per job"):
        _launch.check_launcher(("slurm", None))
    monkeypatch.setenv("SWEEP_SLURM_CPUS", "1")
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing of SLURM on it
    with pytest.raises(UserError, match=r"^LAUNCHER=slurm needs SLURM's commands, and sbatch, squeue, sinfo, "
                                        r"scancel are not on PATH here"):
        _launch.check_launcher(("slurm", None))


def test_a_job_that_can_never_start_is_reported_and_cancelled(tmp_path, demo_root, cluster):
    if cluster["cores"] < 2:
        pytest.skip("needs a node with 2 cores or more")
    # A partition limit that sinfo's node list does not show: SLURM keeps the job pending (PartitionConfig).
    partition = cluster["partition"]
    assert slurm("scontrol", "update", f"PartitionName={partition}", "MaxCPUsPerNode=1").returncode == 0
    try:
        proc = start_sweep(dict(JOB_SETTINGS, SWEEP_SLURM_CPUS="2", DATA=demo_root, OUTPUT=str(tmp_path),
                                BACKBONE="tiny-clip", SEEDS="1", METHODS="ZeroShotCLIP"))
        out, err = proc.communicate(timeout=300)
    finally:
        slurm("scontrol", "update", f"PartitionName={partition}", "MaxCPUsPerNode=UNLIMITED")
    assert proc.returncode == 1, err
    # Base-to-new ZeroShotCLIP is two rows (template, descriptions): one job each.
    failed = re.findall(r"FAILED ZeroShotCLIP (?:template|descriptions) demo seed 1 base: SLURM job (\S+) can never "
                        r"start: it is pending for PartitionConfig \(SWEEP_SLURM_CPUS=2, SWEEP_SLURM_GPUS=0, "
                        r"SWEEP_SLURM_PARTITION=\(default\)\); change SWEEP_SLURM_CPUS or SWEEP_SLURM_GPUS or "
                        r"SWEEP_SLURM_PARTITION and rerun \(the job was cancelled\)", out)
    assert failed and set(failed) <= set(re.findall(r"as job (\S+)", out)), out
    # A cancelled job may already have left squeue's memory (None).
    assert all((job_state(job) or "CANCELLED").startswith("CANCELLED") for job in failed) and not active_jobs()


def test_ctrl_c_says_the_jobs_keep_running_and_how_to_cancel_them(tmp_path, demo_root, cluster):
    proc = start_sweep(dict(JOB_SETTINGS, DATA=demo_root, OUTPUT=str(tmp_path), BACKBONE="tiny-clip", SEEDS="1",
                            METHODS="MedPromptCLIP", OPTS="OPTIM.MAX_EPOCH 500"))
    job = None
    try:
        for line in proc.stdout:
            if line.startswith("queued "):
                job = re.search(r"as job (\S+)", line).group(1)
                break
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130
        lines = err.strip().splitlines()
        assert lines[-1] == "interrupted; rerun to resume" and "Traceback" not in err
        assert ("the sweep's 1 SLURM job(s) keep running (rerun the sweep to wait for them again: finished runs are "
                f"reused); to stop them: scancel {job}") in out
        assert job in active_jobs()
        # The job still needs its group file.
        assert list(tmp_path.rglob(".submitit/*/groups/g1.json"))
    finally:
        if proc.poll() is None:
            proc.kill()
        if job:
            slurm("scancel", job)
