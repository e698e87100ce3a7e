"""The pipeline's import rules hold (import-linter contracts in pyproject.toml)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.config import FIELDS

ROOT = Path(__file__).parent.parent


def test_import_contracts_kept() -> None:
    """Sources never import sinks; layers point one way."""
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("import-linter is part of the test extras; install .[test]")
    done = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "BROKEN" not in done.stdout


def test_readme_documents_every_variable() -> None:
    """The README's configuration table has a row for every variable, with its default."""
    readme = (ROOT / "README.md").read_text()
    for field in FIELDS:
        row = re.search(rf"^\| `{field.env}` \| ([^|]*) \|", readme, re.MULTILINE)
        assert row, field.env
        if field.default is not None:
            assert field.default in row.group(1), field.env


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run runs exactly the README's test command."""
    command = 'python3 -m pip install -q -e ".[test]" && python3 -m pytest -q'
    assert command in (ROOT / ".ci" / "run").read_text()
    assert command in (ROOT / "README.md").read_text()
