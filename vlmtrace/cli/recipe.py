"""`vlmtrace recipe NAME`: run one seed method end to end, store it, draw it, summarise it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def recipe(
    name: Annotated[str, typer.Argument(help="Recipe name, or 'list' to list them.")],
    model: Annotated[str | None, typer.Option(help="HF repo id, directory or organism name.")] = None,
    data: Annotated[Path | None, typer.Option(help="A dataset file or directory (see README).")] = None,
    n_samples: Annotated[int, typer.Option(help="Samples to trace.")] = 8,
    out: Annotated[Path | None, typer.Option(help="Zarr store to write (default: NAME.zarr).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of data sampling and noise.")] = 0,
    max_batch: Annotated[int, typer.Option(help="Rows per batched forward.")] = 64,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store.")] = False,
    remote: Annotated[
        bool, typer.Option(help="Run every trace on a server (NDIF or `vlmtrace serve`); key: $NDIF_API_KEY.")
    ] = False,
    host: Annotated[
        str | None, typer.Option(help="Server URL for --remote (default: $NDIF_HOST, else NDIF).")
    ] = None,
) -> None:
    from .. import recipes as registry
    from ..models.load import load
    from ..results import save

    if name == "list":
        for recipe_name in registry.names():
            typer.echo(f"{recipe_name:<20} {registry.get(recipe_name).DESCRIPTION}")
        return
    try:
        module = registry.get(name)
    except KeyError as error:
        raise typer.BadParameter(str(error.args[0]), param_hint="NAME") from None
    out = out or Path(f"{name}.zarr")
    if out.exists() and not overwrite:
        raise typer.BadParameter(f"{out} exists; pass --overwrite to replace it.", param_hint="--out")
    backend = None
    if remote:  # the client only plans and encodes: no weights needed here
        from ..remote import backend as remote_backend
        from ..remote import skeleton

        vlm = skeleton(model or module.DEFAULT_MODEL)
        backend = remote_backend(vlm, host=host)
    else:
        vlm = load(model or module.DEFAULT_MODEL, device=device)
    if data is not None:
        from ..data.loaders import load_dataset

        samples = load_dataset(data, n=n_samples)
    else:
        samples = module.default_samples(vlm, n=n_samples, seed=seed)
    ds = module.run(vlm, samples, max_batch=max_batch, seed=seed, backend=backend)
    save(ds, out, overwrite=overwrite)
    figures = module.figures(ds, out.with_suffix(""))
    typer.echo(f"store: {out}")
    for figure in figures:
        typer.echo(f"figure: {figure}")
    typer.echo(module.summary(ds))
