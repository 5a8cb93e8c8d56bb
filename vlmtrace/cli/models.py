"""`vlmtrace models` and `vlmtrace check MODEL`: what vlmtrace supports, and whether it holds here.

`models` prints the support matrix: for each family, what the reference tests showed (sites,
corruptions, directions, knockout, attention patterns, prefix reuse, served remotely, a request
that imports only what NDIF's servers have). The matrix is
generated from test results by `python tests/support_matrix.py`, never written by hand, and
shipped as `vlmtrace/models/support.json`.

`check` loads a model and runs the engine's invariants on it (`vlmtrace.engine.invariants`): the way
to learn whether a model, a checkpoint or an adapter of your own gives trustworthy traces.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Annotated

import typer

COLUMNS = ("sites", "corruptions", "directions", "knockout", "patterns", "prefix reuse", "remote", "ndif")


def support() -> dict:
    """The shipped support matrix (families -> what the tests showed)."""
    text = resources.files("vlmtrace.models").joinpath("support.json").read_text()
    return json.loads(text)


def matrix_rows(data: dict) -> list[tuple[str, ...]]:
    """One row per family: name, then each column's text."""
    rows = []
    for family, entry in sorted(data["families"].items()):
        rows.append((family, *(entry["columns"].get(column, "untested") for column in COLUMNS)))
    return rows


def models() -> None:
    """Print the support matrix: every family, and what its reference tests showed."""
    data = support()
    rows = matrix_rows(data)
    header = ("family", *COLUMNS)
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo(
            "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    typer.echo(f"\nfrom `{data['command']}` on {data['generated']} (transformers {data['transformers']})")


def check(
    model: Annotated[str, typer.Argument(help="HF repo id, local directory or organism name.")],
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    dtype: Annotated[
        str | None, typer.Option(help="float32, bfloat16, float16 (default: the checkpoint's).")
    ] = None,
) -> None:
    """Run the engine's invariants on MODEL and print a table; exit 1 if any fails."""
    from ..engine.invariants import check as run_checks
    from ..models.load import NotAModelError, check_device, load
    from .hub import check_model_source

    try:
        check_device(device)
    except NotAModelError as error:
        raise typer.BadParameter(str(error), param_hint="--device") from None
    check_model_source(model)  # a model that is neither shipped, here nor reachable: named at once
    report = run_checks(load(model, device=device, dtype=dtype))
    typer.echo(str(report))
    if not report.ok:
        raise typer.Exit(1)
