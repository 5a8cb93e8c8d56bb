"""`vlmtrace data`: tiny copies of the published data layouts, to try `--data` before downloading.

    vlmtrace data example vqa vqa/
    vlmtrace recipe visual_constraint --data vqa/ --span visual=@demonstrative --keep-wrong

A thin shell over `vlmtrace.data.examples` (PIL only: no torch, so it answers at once).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..data.examples import EXAMPLES, write_example

app = typer.Typer(help="Example data in each published layout that --data reads.", no_args_is_help=True)

Layout = Enum("Layout", {name: name for name in EXAMPLES}, type=str)
"""The example layouts, as choices (their names show in `--help`)."""


@app.command(
    help="Write a tiny example (a few KB) of LAYOUT into the new or empty folder DIR, and print the "
    "path that --data takes.\n\n"
    + "\n\n".join(f"{name}: {example.what}" for name, example in EXAMPLES.items())
)
def example(
    layout: Annotated[Layout, typer.Argument(help="The published layout to copy.", show_default=False)],
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="A new or empty folder to write it into.")],
) -> None:
    paths = write_example(layout.value, folder)
    typer.echo(f"wrote a tiny {EXAMPLES[layout.value].what} in {folder}")
    for path in paths:
        typer.echo(f"  --data {path}")
