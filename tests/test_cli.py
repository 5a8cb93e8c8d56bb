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


def test_shard_and_memory_options_parse_and_bad_values_name_the_form():
    import pytest
    import typer

    from vlmtrace.cli.recipe import parse_bytes, parse_shard

    assert parse_shard("1/4") == (1, 4)
    assert parse_bytes("20GB") == 20e9 and parse_bytes("512MiB") == 512 * 2**20
    with pytest.raises(typer.BadParameter, match="e.g. 0/2 and 1/2"):
        parse_shard("4/4")
    with pytest.raises(typer.BadParameter, match="such as 20GB"):
        parse_bytes("lots")


def test_sharding_without_a_shared_store_is_refused():
    import pytest

    import vlmtrace as vt

    with pytest.raises(ValueError, match="sharding needs a store"):
        vt.Options(shard=(0, 2))
