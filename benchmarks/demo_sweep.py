"""The base-to-new demo sweep end to end, with the previous defaults and with today's.

    python benchmarks/demo_sweep.py            # SEEDS, METHODS as for scripts/base2new.sh

"previous" runs every run with torch's default threads (one per core) and no persistent
feature cache; "current" runs with the defaults (one thread for the demo backbone, test
images and description targets encoded once per backbone across runs). Each sweep
starts from an empty output folder; both print the same table.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sweep(output, env_extra):
    env = dict(os.environ, OUTPUT=output, TQDM_DISABLE="1", **env_extra)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, os.path.join(PROJECT_DIR, "scripts", "sweep.py"), "base2new", "demo"],
                         env=env, capture_output=True, text=True, cwd=PROJECT_DIR)
    if out.returncode != 0:
        sys.exit(f"sweep failed:\n{out.stdout}\n{out.stderr}")
    return time.perf_counter() - start, out.stdout


def main():
    work = tempfile.mkdtemp(prefix="bench-sweep-")
    data = os.environ.get("DATA", os.path.join(work, "data"))
    cores = str(os.cpu_count() or 1)
    previous = {"DATA": data, "MEDPROMPTCLIP_THREADS": cores, "OPTS": (os.environ.get("OPTS", "") + " TEST.FEATURE_CACHE ''").strip()}
    current = {"DATA": data}
    # Generate the demo data first, so that neither sweep pays for it.
    subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, '.'); from datasets.demo import generate_demo; "
                    f"generate_demo({os.path.join(data, 'demo')!r})"], cwd=PROJECT_DIR, check=True)
    t_prev, _ = sweep(os.path.join(work, "previous"), previous)
    t_cur, table = sweep(os.path.join(work, "current"), current)
    print(table.strip().splitlines()[-1] if table.strip() else "")
    print(f"machine: {cores} cores")
    print(f"previous defaults ({cores} threads, no feature cache): {t_prev:.0f} s")
    print(f"current defaults: {t_cur:.0f} s -> {t_prev / t_cur:.2f}x faster")


if __name__ == "__main__":
    main()
