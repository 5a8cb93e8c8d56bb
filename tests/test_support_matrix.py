"""The support matrix covers every family, and `vlmtrace models` / `vlmtrace check` work."""

from __future__ import annotations

import importlib
import pkgutil

import families
from typer.testing import CliRunner

from vlmtrace.cli import app
from vlmtrace.cli.models import support
from vlmtrace.models.registry import registered


def test_the_shipped_matrix_lists_every_registered_family():
    listed = set(support()["families"])
    registered_families = {adapter.family for adapter in registered()}
    assert registered_families <= listed, (
        f"regenerate with `python tests/support_matrix.py`: {registered_families - listed}"
    )


def test_every_family_with_a_reference_test_is_in_the_matrix_with_its_results():
    matrix = support()["families"]
    for info in pkgutil.iter_modules(families.__path__):
        if info.name == "spec":
            continue
        family = importlib.import_module(f"families.{info.name}").FAMILY.name
        assert family in matrix, f"{family}: regenerate with `python tests/support_matrix.py`"
        assert matrix[family]["columns"]["sites"] != "untested", family


def test_vlmtrace_models_prints_one_row_per_family():
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    for family in support()["families"]:
        assert any(line.startswith(family + " ") for line in result.output.splitlines()), family


def test_vlmtrace_check_passes_on_the_shipped_organism():
    result = CliRunner().invoke(app, ["check", "shapes-llava"])
    assert result.exit_code == 0, result.output
    assert "all invariants hold" in result.output
    checked = [line for line in result.output.splitlines() if line.startswith("  ")]
    assert len(checked) == 8 and all(line.split()[0] == "ok" for line in checked), result.output
    assert "the clean row equals the model's own forward" in result.output
