"""Each experiment script's --quick mode runs end to end and writes its Markdown table and PNG plot.

Slow (each loads the real SmolLM2 or builds GPT-2 shapes, ~1–2 min on 2 cores); CI runs them. Outputs go to
a tmp dir: the committed full-mode outputs in docs/experiments/ are never touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["latency", "rank", "subspace", "savings"]


def run_quick(script: str, out: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LORAKIT_EXPERIMENTS_CACHE=str(cache))
    return subprocess.run([sys.executable, str(REPO / "experiments" / f"{script}.py"), "--quick", "--out", str(out),
                           "--threads", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_mode_writes_table_and_plot(script: str, tmp_path: Path) -> None:
    result = run_quick(script, tmp_path / "out", tmp_path / "cache")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    md = (tmp_path / "out" / f"{script}.md").read_text()
    assert (tmp_path / "out" / f"{script}.png").stat().st_size > 1000
    assert "QUICK MODE" in md
    assert "- command:" in md and "- machine:" in md and "- date:" in md
    assert "Compared with the paper" in md
    assert "| ---" in md.replace("|---", "| ---")  # a Markdown table
    committed = REPO / "docs" / "experiments" / f"{script}.md"
    if committed.exists():  # quick mode must never overwrite the committed full-mode output
        assert "QUICK MODE" not in committed.read_text()


@pytest.mark.slow
def test_quick_mode_refuses_to_write_into_docs() -> None:
    result = subprocess.run([sys.executable, str(REPO / "experiments" / "savings.py"), "--quick"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--out" in result.stderr
