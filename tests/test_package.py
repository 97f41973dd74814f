"""Package-wide conventions: one version, one-line error messages, no ``import linconv`` from inside."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from linconv.cli import app
from linconv.errors import first_line
from linconv.version import __version__

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_pyprojects_and_the_clis():
    assert re.search(r'^version = "(.*)"$', (ROOT / "pyproject.toml").read_text(), re.M)[1] == __version__
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"linconv {__version__}"


def test_no_module_of_the_package_imports_linconv_itself():
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted((ROOT / "linconv").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.match(r"\s*import linconv\s*($|#|,)", line)
    ]
    assert offenders == []


@pytest.mark.parametrize(
    "exc, plain, typed",
    [
        (ValueError("\n  cannot read header:\n details\n"), "cannot read header", "ValueError: cannot read header"),
        (KeyError("x"), "'x'", "KeyError: 'x'"),
        (RuntimeError(""), "RuntimeError", "RuntimeError"),
    ],
)
def test_first_line_is_the_first_non_empty_line_or_the_type(exc, plain, typed):
    assert first_line(exc) == plain and first_line(exc, with_type=True) == typed
