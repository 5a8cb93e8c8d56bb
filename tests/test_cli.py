"""The command line is a thin shell over the API, tested in-process."""

from __future__ import annotations

from typer.testing import CliRunner

from vlmtrace.cli import app

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "recipe" in result.output and "zoo" in result.output


def test_recipe_list_names_each_recipe_with_a_description():
    import vlmtrace.recipes as registry

    result = runner.invoke(app, ["recipe", "list"])
    assert result.exit_code == 0
    for name in registry.names():
        assert name in result.output


def test_an_unknown_recipe_is_named_with_the_choices():
    result = runner.invoke(app, ["recipe", "no_such_recipe"])
    assert result.exit_code != 0
    assert "no recipe 'no_such_recipe'" in result.output
