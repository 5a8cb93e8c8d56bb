"""The `vlmtrace` command: a thin typed shell over the Python API.

vlmtrace recipe list
vlmtrace recipe multi_constraint --n-samples 8 --out trace.zarr
vlmtrace zoo list
vlmtrace plot trace.zarr
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .recipe import recipe
from .serve import serve

app = typer.Typer(
    help="Causal tracing, activation patching and attention knockout for vision-language models.",
    no_args_is_help=True,
    add_completion=False,
)
app.command(help="Run a recipe (one per seed paper); `vlmtrace recipe list` names them.")(recipe)
app.command()(serve)

try:  # the organism zoo's commands (train, list, eval)
    from .zoo import app as zoo_app

    app.add_typer(zoo_app, name="zoo", help="The shipped model organisms: list, train, eval.")
except ImportError:  # pragma: no cover - only while the zoo is absent
    pass


@app.command()
def plot(
    store: Annotated[Path, typer.Argument(help="A zarr store written by a recipe.")],
    out: Annotated[
        Path | None, typer.Option(help="Folder for the PNGs (default: next to the store).")
    ] = None,
) -> None:
    """Redraw a recipe's figures from its store (no model needed)."""
    from .. import recipes as registry
    from ..results import open_result

    ds = open_result(store)
    name = ds.attrs.get("recipe", "")
    if name not in registry.names():
        raise typer.BadParameter(f"{store} was not written by a recipe (attrs recipe={name!r}).")
    for path in registry.get(name).figures(ds, out or store.with_suffix("")):
        typer.echo(f"figure: {path}")


@app.command()
def version() -> None:
    """Print the versions that determine a result."""
    from ..results import versions

    for name, value in versions().items():
        typer.echo(f"{name} {value}")
