"""`vlmtrace calibrate`: score every localisation method against the planted organisms.

A thin shell over `vlmtrace.calibration.calibrate`: one printed line per (organism, method)
with its localisation AUROC, precision and recall of the planted components and its MIB
faithfulness (CPR, CMD), and a store (xarray on zarr) with every figure and faithfulness curve.

    vlmtrace calibrate                                    # both planted organisms, every method
    vlmtrace calibrate --organism planted-llava --n-samples 2 --method trace --corruption image_pair
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def calibrate(
    organism: Annotated[
        list[str] | None,
        typer.Option(help="Planted organism or its directory (repeat for several; default: all shipped)."),
    ] = None,
    n_samples: Annotated[int, typer.Option(min=1, help="Held-out questions per organism.")] = 8,
    noise_draws: Annotated[int, typer.Option(min=1, help="Gaussian noise draws per cell.")] = 10,
    method: Annotated[
        list[str] | None,
        typer.Option(help="trace, heads, knockout, atp, ig or edit (repeat; default: all)."),
    ] = None,
    corruption: Annotated[
        list[str] | None, typer.Option(help="str, image_pair or noise (repeat; default: all).")
    ] = None,
    direction: Annotated[
        list[str] | None, typer.Option(help="denoise or noise (repeat; default: both).")
    ] = None,
    window: Annotated[list[int] | None, typer.Option(help="Window sizes (repeat; default: 1 and 3).")] = None,
    image_positions: Annotated[
        bool, typer.Option(help="Also patch the image tokens (3x the cells; text positions only by default).")
    ] = False,
    faithfulness: Annotated[
        bool, typer.Option(help="Measure each method's MIB faithfulness curve (CPR, CMD).")
    ] = True,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="torch CPU threads. Default: $VLMTRACE_THREADS, else 1 (organisms gain nothing from more).",
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Zarr store to write.")] = Path("calibration.zarr"),
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store.")] = False,
) -> None:
    """Run every method on the planted organisms and score it against the planted mechanism."""
    from ..calibration import Settings
    from ..calibration import calibrate as run
    from ..results.dataset import save
    from ..results.store import StoreError
    from .recipe import environment_threads, quiet_transformers, set_threads

    if out.exists() and not overwrite:
        raise StoreError(f"{out} already exists; pass --overwrite to replace it.")
    set_threads(threads or environment_threads() or 1, "")  # organisms are tiny
    quiet_transformers()
    defaults = Settings()
    settings = Settings(
        samples=n_samples,
        noise_draws=noise_draws,
        windows=tuple(window or defaults.windows),
        methods=tuple(method or defaults.methods),
        corruptions=tuple(corruption or defaults.corruptions),
        directions=tuple(direction or defaults.directions),
        faithfulness=faithfulness,
        skip_image=not image_positions,
    )
    ds = run(organism, settings, log=typer.echo)
    save(ds, out, overwrite=overwrite)
    typer.echo(f"calibration store: {out}")
