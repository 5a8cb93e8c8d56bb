"""`vlmtrace recipe NAME`: run one seed method end to end, store it, draw it, summarise it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from ..options import Options

UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'I/N' -> (I, N), with an error that shows the form."""
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not I/N, e.g. 0/2 and 1/2.", param_hint="--shard") from None
    if not 0 <= index < count:
        raise typer.BadParameter(f"{text!r}: need 0 <= I < N, e.g. 0/2 and 1/2.", param_hint="--shard")
    return index, count


def parse_bytes(text: str | None) -> float | None:
    """'20GB' / '512MiB' / '1e9' -> bytes."""
    if text is None:
        return None
    number = text.rstrip("BbKkMmGgTtIi ")
    unit = text[len(number) :].strip().upper()
    if unit not in UNITS:
        raise typer.BadParameter(f"{text!r}: use a size such as 20GB or 512MiB.", param_hint="--max-memory")
    try:
        return float(number) * UNITS[unit]
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: use a size such as 20GB or 512MiB.", param_hint="--max-memory"
        ) from None


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
    shard: Annotated[
        str | None, typer.Option(help="I/N: run the I-th of N disjoint parts of the samples (0-based).")
    ] = None,
    max_memory: Annotated[
        str | None, typer.Option(help="Memory a forward may use, e.g. 20GB; chunks shrink to fit.")
    ] = None,
    screen: Annotated[
        int | None, typer.Option(help="Patch only the top-K cells by attribution-patching estimate.")
    ] = None,
    reuse_prefix: Annotated[
        bool,
        typer.Option(
            help="Skip the layers and positions below each cell's first patch (same results; local runs)."
        ),
    ] = False,
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
    options = Options(
        max_batch=max_batch,
        max_memory=parse_bytes(max_memory),
        parts=out.with_suffix(".parts"),  # one resumable store per sub-sweep: rerun to resume
        shard=parse_shard(shard),
        overwrite=overwrite,
        screen=screen,
        reuse_prefix=reuse_prefix,
    )
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
    ds = module.run(vlm, samples, seed=seed, options=replace(options, backend=backend))
    if "done" in ds and not bool(ds["done"].all()):
        typer.echo(
            f"shard {shard} done: {int(ds['done'].sum())} of {ds['done'].size} (sample, part) results are in "
            f"{options.parts}. Run the same command without --shard once every shard has finished to "
            "assemble the store and figures."
        )
        return
    save(ds, out, overwrite=overwrite)
    figures = module.figures(ds, out.with_suffix(""))
    typer.echo(f"store: {out}")
    for figure in figures:
        typer.echo(f"figure: {figure}")
    typer.echo(module.summary(ds))
