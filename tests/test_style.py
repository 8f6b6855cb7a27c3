"""The code stays `ruff check`, `ruff format --check` and shellcheck clean; CI runs this like any
test."""

from __future__ import annotations

import subprocess

import pytest

from tests.servers import BIN, ROOT


def shell_scripts() -> list[str]:
    """Every shell script of scripts/ (by its shebang or its .sh name) and the CI entry point, so
    that a new script is checked without anyone listing it here."""
    found = []
    for path in sorted((ROOT / "scripts").iterdir()):
        if not path.is_file():
            continue
        with path.open("rb") as f:
            first = f.readline()
        if path.suffix == ".sh" or (first.startswith(b"#!") and first.rstrip().endswith(b"sh")):
            found.append(str(path.relative_to(ROOT)))
    return [*found, ".ci/run"]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff(args):
    result = subprocess.run([str(BIN / "ruff"), *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shell_scripts_are_found():
    scripts = shell_scripts()
    expected = ["scripts/bench", "scripts/lib.sh", "scripts/servers", "scripts/test", "scripts/up"]
    assert set(expected) <= set(scripts), scripts
    assert "scripts/benchkit.py" not in scripts


def test_shellcheck():
    # -x follows `source`, whose `# shellcheck source=` paths are relative to the root.
    scripts = shell_scripts()
    result = subprocess.run(
        [str(BIN / "shellcheck"), "-x", *scripts], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
