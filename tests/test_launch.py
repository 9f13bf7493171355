"""The launch scripts find the project's Python themselves ($PYTHON, else the .venv beside the checkout, else the
active python3), say which, and stop with a clear message when none has torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def which_python(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f'source "{REPO}/launch/python.sh" && echo "$PY" && echo "$PYTHONPATH"'],
                          env=env, capture_output=True, text=True, timeout=120)


def test_python_given_by_the_environment_is_used_and_named():
    done = which_python({"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    py, path = done.stdout.split("\n")[:2]
    assert py == sys.executable and f"using {sys.executable} (Python 3." in done.stderr and "torch" in done.stderr
    assert path.split(":")[0] == str(REPO)  # runs from an uninstalled checkout too


def test_a_python_without_torch_stops_with_what_to_do(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    done = which_python({"PATH": "/usr/bin:/bin", "PYTHON": str(fake)})
    assert done.returncode == 1 and f"no Python with torch (tried '{fake}')" in done.stderr
    assert "set PYTHON=/path/to/python" in done.stderr


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "python").exists(), reason="no .venv beside the checkout")
def test_the_venv_beside_the_checkout_is_found_without_activation():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/bin:/bin"
    done = which_python(env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == str(REPO / ".venv" / "bin" / "python")
