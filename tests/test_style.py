"""The code stays `ruff check` and `ruff format --check` clean; CI runs this like any test."""

from __future__ import annotations

import subprocess

import pytest

from tests.servers import BIN, ROOT


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff(args):
    result = subprocess.run([str(BIN / "ruff"), *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
