"""benchmarks/README.md states only figures that the committed results hold: its table is the one current.py
generates from them, and every result file that a row reads exists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_table_of_current_figures_is_generated_from_the_committed_results():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "current.py"), "--check"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    table = subprocess.run([sys.executable, str(REPO / "benchmarks" / "current.py")], capture_output=True, text=True,
                           timeout=120).stdout
    assert table.count("\n") >= 10 and "fused AdamW" in table and "public base" in table


def test_the_check_fails_when_the_table_was_edited_by_hand(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import current
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    edited = tmp_path / "README.md"
    edited.write_text(current.README.read_text().replace("fused AdamW", "fused AdamW (hand-edited)", 1))
    monkeypatch.setattr(current, "README", edited)
    monkeypatch.setattr(sys, "argv", ["current.py", "--check"])
    assert current.main() == 1
