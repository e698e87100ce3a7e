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


def test_docs_document_every_variable() -> None:
    """docs/configuration.md's settings table has a row for every variable, with its default."""
    page = (ROOT / "docs" / "configuration.md").read_text()
    for field in FIELDS:
        row = re.search(rf"^\| `{field.env}` \| ([^|]*) \|", page, re.MULTILINE)
        assert row, field.env
        if field.default is not None:
            assert field.default in row.group(1), field.env


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run runs exactly the README's test command."""
    command = 'python3 -m pip install -q -e ".[test]" && python3 -m pytest -q'
    assert command in (ROOT / ".ci" / "run").read_text()
    assert command in (ROOT / "README.md").read_text()


# -- the documentation stays whole --------------------------------------------------------------

DOC_PAGES = ("README.md", "docs/*.md", "examples/README.md")
# Written in two pieces so this file does not match itself.
DANGLING = ("DESIGN" + " §", "DESIGN" + ".md", "next" + " issue")
SKIPPED_DIRS = {".git", ".hypothesis", ".pytest_cache", ".import_linter_cache", ".benchmarks",
                "__pycache__", "build", "dist", ".venv", ".whl"}


def anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def broken_links(page: Path) -> list[str]:
    """Relative links of a markdown page whose file (or #heading) does not exist."""
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif fragment and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), re.MULTILINE)
            if fragment not in {anchor(h) for h in headings}:
                broken.append(target)
    # and the repository paths it names in code spans, such as `tests/integration/test_x.py`
    for named in re.findall(r"`((?:agent|bench|config|docs|examples|tests|\.ci)/[\w./-]*)`", text):
        if not (root_of(page) / named).exists():
            broken.append(named)
    return broken


def root_of(page: Path) -> Path:
    """The repository root above a page (the folder holding pyproject.toml), else its folder."""
    return next((p for p in page.resolve().parents if (p / "pyproject.toml").exists()),
                page.parent)


def dangling_mentions(root: Path) -> list[str]:
    """Files under root that cite a document not in the repository or promise later work."""
    found = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or SKIPPED_DIRS & set(path.relative_to(root).parts) \
                or path.suffix == ".egg-info" or any(p.endswith(".egg-info") for p in path.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files
        found += [f"{path.relative_to(root)}: {n}" for n in DANGLING if n.lower() in text.lower()]
    return found


def test_every_relative_link_in_the_docs_resolves() -> None:
    """Each relative link of README.md, docs/*.md and examples/README.md names a file that
    exists, and a #heading that exists in it."""
    pages = [p for pattern in DOC_PAGES for p in sorted(ROOT.glob(pattern))]
    assert len(pages) >= 8, pages  # README, six docs pages, the examples' README
    assert {p: broken_links(p) for p in pages if broken_links(p)} == {}


def test_no_file_cites_a_missing_document_or_a_next_issue() -> None:
    """No file in the repository cites a design document it does not hold, or defers to later."""
    assert dangling_mentions(ROOT) == []


def test_the_checks_find_what_they_look_for(tmp_path: Path) -> None:
    """The two checks above catch a dangling citation, a missing file and a missing heading."""
    (tmp_path / "a.py").write_text(
        f'"""Rules ({DANGLING[0]}4); the spool comes in the {DANGLING[2]}s."""\n')
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Some heading\n\n[ok](page.md#some-heading) [ok](#title) "
                    "[gone](missing.md) [bad](page.md#nowhere) [web](https://example.com) "
                    "`tests/gone.py` `tests/` `/aws/sagemaker/Endpoints`\n")
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "tests").mkdir()
    assert dangling_mentions(tmp_path) == [f"a.py: {DANGLING[0]}", f"a.py: {DANGLING[2]}"]
    assert broken_links(page) == ["missing.md", "page.md#nowhere", "tests/gone.py"]
