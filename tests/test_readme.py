"""The README's quick start and CI run the same commands."""
import os
import re

from conftest import PROJECT_DIR


def test_ci_runs_the_readme_install_and_test_commands():
    readme = open(os.path.join(PROJECT_DIR, "README.md")).read()
    quick_start = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", quick_start, re.S).group(1).strip().splitlines()
    install, test = block[0], block[-1]
    ci = [line.strip() for line in open(os.path.join(PROJECT_DIR, ".ci", "run")) if line.strip() and not line.startswith("#")]
    assert install in ci and test in ci
    assert ci.index(install) < ci.index(test)


def test_readme_installs_into_a_fresh_virtual_environment_and_ci_makes_it_inside_the_clone():
    readme = open(os.path.join(PROJECT_DIR, "README.md")).read()
    quick_start = readme.split("## Quick start", 1)[1]
    install = re.search(r"```bash\n(.*?)```", quick_start, re.S).group(1).strip().splitlines()[0]
    assert install.startswith("python3 -m venv .venv && . .venv/bin/activate && ") and "pip install -r requirements.txt" in install
    ci = open(os.path.join(PROJECT_DIR, ".ci", "run")).read()
    assert 'cd "$(dirname "$0")/.."' in ci and "rm -rf .venv" in ci  # fresh, inside the clone
    assert ".venv/" in open(os.path.join(PROJECT_DIR, ".gitignore")).read().split()
