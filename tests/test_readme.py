"""The README's Quickstart, as a user copies it: it runs offline and prints what its comments say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quickstart() -> str:
    """The first ``python`` block after the README's ``## Quickstart`` heading."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Quickstart\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README.md: no ```python block under ## Quickstart"
    return match.group(1)


def promised(code: str, call: str) -> str:
    """The comment the README writes after ``call``: what that line prints."""
    line = next(line for line in code.splitlines() if line.startswith(call))
    return line.split("  # ", 1)[1]


@pytest.mark.slow
def test_quickstart_runs_and_prints_what_it_says(tmp_path) -> None:
    code = quickstart()
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.splitlines()
    assert promised(code, "model.print_trainable_parameters()") in printed
    assert promised(code, "print(len(methods), methods[:4])") in printed
    assert (tmp_path / "out" / "bitfit" / "adapter_model.safetensors").is_file()  # written where it was run
