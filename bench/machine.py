"""Facts about this machine that every benchmark report states."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" when it cannot be read)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


SERVER_PYTHON = "BENCH_SERVER_PYTHON"


def discovery_command() -> list[str]:
    """How a bench starts `discovery`: this Python, or the one named by $BENCH_SERVER_PYTHON (a
    venv with other code installed: bench/versus.py sets it to compare two revisions). `-P`
    keeps the working directory off sys.path, so the checkout the bench runs from cannot shadow
    the code installed in that venv."""
    return [os.environ.get(SERVER_PYTHON) or sys.executable, "-P", "-m", "discovery"]
