"""Sweeps leave no process, lock or traceback behind, and no tool counts a row leading outside the data as present."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import PROJECT_DIR
from datasets.demo import draw_image

sys.path.insert(0, os.path.join(PROJECT_DIR, "scripts"))
import _launch  # noqa: E402
import sweep  # noqa: E402


def children(pid):
    """Live (not zombie) processes whose parent is ``pid``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(name))
    return found


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def is_pool_worker(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"spawn_main" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pool_workers_end_when_the_sweep_is_killed(tmp_path, demo_root):
    env = dict(os.environ, HF_HUB_OFFLINE="1", DATA=demo_root, OUTPUT=str(tmp_path), BACKBONE="tiny-clip",
               SEEDS="1 2", METHODS="CoOp", LAUNCHER="local:2", OPTS="OPTIM.MAX_EPOCH 500")
    proc = subprocess.Popen([sys.executable, os.path.join(PROJECT_DIR, "scripts", "sweep.py"), "base2new", "demo"],
                            cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    workers = []
    try:
        for line in proc.stdout:
            if line.startswith("start  "):
                break
        workers = [p for p in children(proc.pid) if is_pool_worker(p)]
        assert len(workers) == 2
        time.sleep(1)
        proc.kill()  # kill -9: no chance to stop its workers
        proc.wait()
        deadline = time.time() + 15
        while any(alive(p) for p in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not [p for p in workers if alive(p)]
        assert not list(tmp_path.rglob("run.lock"))  # their runs stopped as on Ctrl-C and released the locks
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def write_lock(folder, **owner):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, _launch.LOCK_FILE), "w") as f:
        json.dump(dict(owner, host=socket.gethostname()), f)
    return os.path.join(folder, _launch.LOCK_FILE)


def test_same_host_lock_of_a_reused_pid_or_without_heartbeat_is_taken_over(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = _launch.process_start(other.pid)
        assert start is not None
        # The pid is alive, but it is not the process that wrote the lock (it started at another time).
        write_lock(str(tmp_path / "reused"), pid=other.pid, start=start + 1)
        lock = _launch.RunLock(str(tmp_path / "reused"))
        assert lock.try_acquire() is True
        lock.release()

        # Its own process, but the heartbeat stopped long ago (a hung owner): taken over as well.
        path = write_lock(str(tmp_path / "silent"), pid=other.pid, start=start)
        live = _launch.RunLock(str(tmp_path / "silent"))
        assert live.try_acquire()["pid"] == other.pid  # refreshed: the owner is waited for
        old = time.time() - _launch.STALE_AFTER_S - 60
        os.utime(path, (old, old))
        assert live.try_acquire() is True
        assert json.load(open(path))["start"] == _launch.process_start(os.getpid())
        live.release()
    finally:
        other.kill()
        other.wait()


def test_unwritable_output_root_is_one_line(tmp_path, demo_root):
    # Running as root writes anywhere: a folder under a regular file cannot be created by anyone.
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, os.path.join(PROJECT_DIR, "scripts", "sweep.py"), "zeroshot", "demo"],
                          cwd=PROJECT_DIR, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", DATA=demo_root, OUTPUT=str(blocker / "out"),
                                   BACKBONE="tiny-clip", SEEDS="1"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: Not a directory: ") and str(blocker / "out") in line and "writable" in line


def test_read_only_output_root_is_one_line(tmp_path, demo_root, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "out"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # every atomic write fails, as on a read-only disk
    monkeypatch.setenv("MEDPROMPTCLIP_DIGEST_STORE", "")  # the sweep sets it: restored afterwards
    for key, value in dict(DATA=demo_root, OUTPUT=str(tmp_path / "out"), BACKBONE="tiny-clip", SEEDS="1").items():
        monkeypatch.setenv(key, value)
    assert sweep.main(["zeroshot", "demo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Read-only file system: ") and err.count("\n") == 1 and "Traceback" not in err


def head_ct_with_outside_rows(tmp_path):
    folder = tmp_path / "data" / "Head_CT"
    (folder / "img").mkdir(parents=True)
    for i in range(4):
        draw_image("xray_ring", i, size=16).save(folder / "img" / f"{i}.png")
    outside = tmp_path / "elsewhere.png"
    draw_image("xray_ring", 9, size=16).save(outside)
    (folder / "img" / "link.png").symlink_to(outside)
    rows = [[f"img/{i}.png", i % 2, ["Normal_brain", "Brain_bleeding"][i % 2]] for i in range(4)]
    bad = [["img/link.png", 0, "Normal_brain"], ["../../elsewhere.png", 0, "Normal_brain"], [str(outside), 1, "Brain_bleeding"]]
    (folder / "data_split.json").write_text(json.dumps({"train": rows + bad, "val": [], "test": rows}))
    return str(tmp_path / "data")


def test_catalog_and_preflight_report_rows_outside_the_data_as_errors(tmp_path, capsys, monkeypatch):
    from datasets.__main__ import main as catalog

    root = head_ct_with_outside_rows(tmp_path)
    assert catalog(["--root", root]) == 1
    captured = capsys.readouterr()
    (row,) = [line for line in captured.out.splitlines() if line.startswith("Head_CT")]
    assert "3 row(s) lead outside the image folder" in row and "8/11" in row
    (error,) = [line for line in captured.err.splitlines() if "Head_CT" in line]
    assert error.startswith("error: dataset Head_CT: split file ") and "train row 4 path 'img/link.png' and 2 more" in error

    for key, value in dict(DATA=root, BACKBONE="tiny-clip", OUTPUT=str(tmp_path / "out")).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(sweep.UserError) as info:
        sweep.preflight(sweep.Settings("Head_CT"), ["Head_CT"])
    assert "train row 4 path 'img/link.png' and 2 more lead(s) outside the image folder" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_make_split_refuses_files_linked_from_outside(tmp_path, capsys):
    from datasets.make_split import main as make_split

    data = tmp_path / "data"
    for name in ("a", "b"):
        (data / "Mine" / name).mkdir(parents=True)
        for i in range(4):
            draw_image("xray_ring", i, size=16).save(data / "Mine" / name / f"{i}.png")
    outside = tmp_path / "outside"
    outside.mkdir()
    for i in range(4):
        draw_image("xray_ring", 9 + i, size=16).save(outside / f"x{i}.png")
    (data / "Mine" / "a" / "x.png").symlink_to(outside / "x0.png")
    assert make_split(["--root", str(data), "--folder", "Mine"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a/x.png" in err and "lead(s) outside it through a link" in err
    assert sorted(os.listdir(data / "Mine")) == ["a", "b"]  # nothing written

    (data / "Mine" / "a" / "x.png").unlink()
    (data / "Mine" / "c").symlink_to(outside, target_is_directory=True)  # a class folder linked from elsewhere
    assert make_split(["--root", str(data), "--folder", "Mine"]) == 2
    assert "c/x0.png and 3 more" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_pool_worker_ends_on_sigterm_and_the_sweep_says_so(tmp_path, demo_root):
    env = dict(os.environ, HF_HUB_OFFLINE="1", DATA=demo_root, OUTPUT=str(tmp_path), BACKBONE="tiny-clip",
               SEEDS="1 2", METHODS="CoOp", LAUNCHER="local:2", OPTS="OPTIM.MAX_EPOCH 500")
    proc = subprocess.Popen([sys.executable, os.path.join(PROJECT_DIR, "scripts", "sweep.py"), "base2new", "demo"],
                            cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        for line in proc.stdout:
            if line.startswith("start  "):
                break
        workers = [p for p in children(proc.pid) if is_pool_worker(p)]
        assert len(workers) == 2
        time.sleep(1)
        os.kill(workers[0], signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("error: a worker process of the sweep stopped")
        assert not [p for p in workers if alive(p)] and not list(tmp_path.rglob("run.lock"))
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
