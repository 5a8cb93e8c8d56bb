"""The `vlmtrace` command: a thin typed shell over the Python API.

vlmtrace recipe list
vlmtrace recipe multi_constraint --n-samples 8 --out trace.zarr
vlmtrace zoo list
vlmtrace cluster status trace.zarr
vlmtrace calibrate --n-samples 8
vlmtrace plot trace.zarr
vlmtrace data example vqa vqa/

A user's mistake (any `vlmtrace.UserError`: a bad path, a span not in the prompt, an
unreachable hub) prints one short paragraph and exits with status 2; `--debug` (or
VLMTRACE_DEBUG=1) shows its traceback. Anything else is a bug and keeps its traceback.
Modules that need torch are imported inside the commands, so `--help` starts at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from ..errors import UserError
from .calibrate import calibrate
from .cluster import app as cluster_app
from .data import app as data_app
from .models import check, models
from .recipe import recipe
from .serve import serve
from .zoo import app as zoo_app

USER_ERROR_EXIT = 2  # the status click gives a bad option, too


class Commands(TyperGroup):
    """vlmtrace's command group: user errors become one paragraph and exit status 2; each distinct
    warning is shown once."""

    def invoke(self, ctx: click.Context):
        from ..presentation.warning_lines import each_warning_once

        try:
            with each_warning_once():  # a recipe's sweeps re-encode the same answers: one warning each
                return super().invoke(ctx)
        except UserError as error:
            if ctx.params.get("debug") or os.environ.get("VLMTRACE_DEBUG", "") not in ("", "0"):
                raise
            typer.echo(f"Error ({type(error).__name__}): {error}", err=True)
            typer.echo("(Run with `vlmtrace --debug ...` to see the traceback.)", err=True)
            ctx.exit(USER_ERROR_EXIT)


app = typer.Typer(
    cls=Commands,
    help="Causal tracing, activation patching and attention knockout for vision-language models.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback of a user error (bad input).")
    ] = False,
) -> None:
    """Causal tracing, activation patching and attention knockout for vision-language models."""


app.command(help="Run a recipe (one per seed paper); `vlmtrace recipe list` names them.")(recipe)
app.command()(serve)
app.command()(models)
app.command()(check)
app.command()(calibrate)
app.add_typer(zoo_app, name="zoo", help="The shipped model organisms: list, train, eval.")
app.add_typer(cluster_app, name="cluster", help="Sweeps submitted with `recipe --cluster`: status, resume.")
app.add_typer(data_app, name="data", help="Example data in each published layout that --data reads.")


@app.command()
def plot(
    store: Annotated[Path, typer.Argument(help="A zarr store written by a recipe.")],
    out: Annotated[
        Path | None, typer.Option(help="Folder for the PNGs (default: next to the store).")
    ] = None,
) -> None:
    """Redraw a recipe's figures from its store (no model needed)."""
    from .. import recipes as registry
    from ..results.dataset import open_result

    ds = open_result(store)
    name = ds.attrs.get("recipe", "")
    if name not in registry.names():
        raise typer.BadParameter(f"{store} was not written by a recipe (attrs recipe={name!r}).")
    for path in registry.get(name).figures(ds, out or store.with_suffix("")):
        typer.echo(f"figure: {path}")


@app.command()
def version() -> None:
    """Print the versions that determine a result."""
    from ..results.dataset import versions

    for name, value in versions().items():
        typer.echo(f"{name} {value}")
