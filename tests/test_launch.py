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


def readme_block(marker: str) -> str:
    """The bash block that follows ``<!-- marker -->`` in the README, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    start = text.index(f"<!-- {marker} -->")
    body = text[text.index("```bash\n", start) + len("```bash\n"):]
    return body[: body.index("```")].replace("\\\n", " ")


def test_readme_cpu_workflow_runs_as_written(tmp_path):
    """The README's FlexMoRE block, command by command, in a fresh folder with the entry points on PATH (as after
    the Quickstart's install): each command succeeds and leaves what the next one reads."""
    import json

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "WANDB_MODE": "disabled"}
    commands = [line.split("#")[0].strip() for line in readme_block("readme-cpu-workflow").splitlines()]
    commands = [c for c in commands if c]
    assert len(commands) == 7 and commands[0].startswith("flexmore-train")
    outs = []
    for cmd in commands:
        done = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        outs.append(done.stdout)
    out = tmp_path / "outputs" / "tiny"
    assert (out / "no-facts" / "config.json").is_file()
    for folder in ("routed", "no-facts"):  # the routing rule travels through the opt-out
        assert json.loads((out / folder / "config.json").read_text())["model"]["route_context"] == "posterior"
    rows = json.loads((out / "eval" / "routed.json").read_text())
    losses = {r["task"]: r["score"] for r in rows if r["metric"] == "loss"}
    assert set(losses) == {"val/public", "val/code", "val/math", "val/facts"}
    assert "validation at seq_len 128: the length the model was trained at" in done.stdout
    assert "val/facts=" in outs[2] and "val/math=" in outs[1]  # each expert validated on its own domain
    # extraction re-fits the compressed expert's router row by default, on the expert's own data and the public data
    refit = json.loads((out / "math-lowrank" / "math-r16" / "manifest.json").read_text())["training"]["router_refit"]
    assert refit["steps"] == 200 and set(refit["samples"]) == {"public", "math-r16"}
