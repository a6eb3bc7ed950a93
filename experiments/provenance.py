"""The one writer of experiment results: every JSON records the code it was measured with.

``write_results(path, results)`` adds ``"git": {"commit": <sha>, "dirty": <bool>}`` (``None``
for both outside a git checkout) and writes the JSON atomically. ``dirty`` is whether tracked
files differ from the commit, not counting ``experiments/results`` and ``experiments/figures``,
which experiments themselves rewrite.
"""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUTS = ("experiments/results", "experiments/figures")


def _git(*args: str) -> str | None:
    """Stdout of ``git args`` run in the repository root, or None when git fails."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout


def git_state() -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout holding the code."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    changes = _git(
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        *(f":(exclude){path}" for path in OUTPUTS),
    )
    return {"commit": commit.strip(), "dirty": None if changes is None else bool(changes.strip())}


def write_results(path: str, results: dict) -> dict:
    """Write ``results`` plus their ``git`` state as JSON to ``path``; returns what was written."""
    from cpjax.io import write_json

    recorded = {**results, "git": git_state()}
    write_json(path, recorded)
    return recorded
