"""`vlmtrace cluster status|resume STORE`, and the submission behind `vlmtrace recipe ... --cluster`.

    vlmtrace recipe multi_constraint --n-samples 512 --device cuda --out mc.zarr \\
        --cluster slurm --shards 8 --partition gpu --gpus-per-task 1 --time 4:00:00 --mem 32G
    vlmtrace cluster status mc.zarr     # per shard: state, job, samples done; assembled or not
    vlmtrace cluster resume mc.zarr     # resubmit the shards that stopped or failed

Each shard's job runs the same recipe command with `--shard I/N` (and without the cluster
options), so it resumes its stores, and the last shard to finish assembles the store and
draws the figures (`vlmtrace.cluster`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from ..errors import UserError

CLUSTER_OPTIONS = ("cluster", "shards", "partition", "gpus_per_task", "time_limit", "mem", "sbatch")
"""The recipe command's options that say how to submit, not what to run: the jobs do not get them."""

app = typer.Typer(no_args_is_help=True)


@app.command()
def status(
    store: Annotated[Path, typer.Argument(help="The store a cluster sweep fills (NAME.zarr).")],
) -> None:
    """Each shard's state, job and samples done, and whether the store is assembled."""
    from ..cluster import SweepState
    from ..results.store import is_vlmtrace_store

    state = SweepState.read(store.absolute())
    typer.echo(f"{state.shards} shards on {state.cluster} ({state.folder}): {state.description}")
    shards = state.shards_now()
    typer.echo(f"{'shard':>5}  {'state':<9} {'job':<14} samples done")
    for shard in shards:
        done = ", ".join(f"{part} {d}/{n}" for part, (d, n) in shard.done.items()) or "-"
        line = f"{shard.index:>5}  {shard.state:<9} {shard.job or '-':<14} {done}"
        if shard.state == "failed":
            line += f"  ({shard.record.get('error', '')})"
        typer.echo(line)
    finished = sum(s.state == "finished" for s in shards)
    if is_vlmtrace_store(state.out):
        typer.echo(f"store: {state.out} (assembled)")
        return
    typer.echo(f"store: {state.out} not assembled yet ({finished} of {state.shards} shards finished)")
    rerun = [s.index for s in shards if s.needs_rerun]
    if rerun:
        typer.echo(f"`vlmtrace cluster resume {store}` resubmits shards {', '.join(map(str, rerun))}.")


@app.command()
def resume(
    store: Annotated[Path, typer.Argument(help="The store a cluster sweep fills (NAME.zarr).")],
) -> None:
    """Resubmit the shards whose jobs stopped (pre-empted, killed, timed out) or failed."""
    from .. import cluster

    jobs = cluster.resume(store)
    if not jobs:
        typer.echo(f"nothing to resubmit: every shard of {store} finished or is still queued or running.")
        return
    echo_submitted(jobs, store)


def submit_recipe_command(ctx: typer.Context, *, out: Path) -> None:
    """`vlmtrace recipe ... --cluster KIND --shards N`: submit N jobs of the command with --shard I/N."""
    from ..cluster import Resources, state
    from ..cluster.shard import RecipeShard
    from ..cluster.submission import submit
    from ..results.store import is_vlmtrace_store

    params = ctx.params
    if params["cluster"] is None:
        raise typer.BadParameter(
            "--shards submits jobs: add --cluster slurm (or local).",
            param_hint="--shards",
        )
    if params["shards"] is None:
        raise typer.BadParameter(
            "--cluster needs --shards N: how many jobs share the sweep.", param_hint="--cluster"
        )
    if params["shard"] is not None:
        raise typer.BadParameter(
            "--cluster gives each job its own --shard I/N; leave out --shard.", param_hint="--shard"
        )
    if params["overwrite"]:
        raise typer.BadParameter(
            "--overwrite is not passed to cluster jobs (each would replace the others' work). Delete "
            f"{out}, {out.with_suffix('.parts')} and {out.with_suffix('.cluster')}, or choose another --out.",
            param_hint="--overwrite",
        )
    if is_vlmtrace_store(out) and not state.state_folder(out.absolute()).exists():
        raise typer.BadParameter(
            f"{out} is complete (written without --cluster): rerun the command without --cluster to draw its "
            "figures, or choose another --out.",
            param_hint="--out",
        )
    resources = Resources(
        partition=params["partition"],
        gpus_per_task=params["gpus_per_task"],
        time=params["time_limit"],
        mem=params["mem"],
        sbatch=parse_sbatch(params["sbatch"] or []),
    )
    words = [params["name"], *option_words(ctx.params, skip=("name", "out")), "--out", str(out.absolute())]
    task = RecipeShard(words)
    jobs = submit(task, out=out, shards=params["shards"], cluster=params["cluster"], resources=resources)
    if not jobs:
        typer.echo(f"nothing to submit: every shard of {out} finished or is still queued or running.")
        typer.echo(f"watch: vlmtrace cluster status {out}")
        return
    echo_submitted(jobs, out)


def echo_submitted(jobs: list[Any], store: Path) -> None:
    typer.echo(f"submitted {len(jobs)} shard job(s): {', '.join(str(j.job_id) for j in jobs)}")
    typer.echo(f"watch: vlmtrace cluster status {store}")


def parse_sbatch(items: list[str]) -> dict[str, str]:
    """['account=lab', 'qos=low'] -> {'account': 'lab', 'qos': 'low'}."""
    options = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE, e.g. account=lab.", param_hint="--sbatch")
        options[key.strip().lstrip("-")] = value.strip()
    return options


def recipe_parameters() -> list[click.Parameter]:
    from . import app as cli

    return typer.main.get_command(cli).commands["recipe"].params  # type: ignore[attr-defined]


def option_words(values: Mapping[str, Any], *, skip: tuple[str, ...] = ()) -> list[str]:
    """Recipe options by Python name -> the words of the command line, without the cluster options,
    `--shard` and the names in `skip`; a name the recipe command lacks is refused."""
    parameters = {p.name: p for p in recipe_parameters() if p.name not in (*CLUSTER_OPTIONS, "shard", *skip)}
    for name in values:
        if name not in parameters and name not in (*CLUSTER_OPTIONS, "shard", *skip):
            raise UserError(f"the recipe command has no option {name!r}; it has {', '.join(parameters)}.")
    words: list[str] = []
    for name, parameter in parameters.items():
        value = values.get(name, parameter.default)
        if value is None or value == parameter.default or parameter.param_type_name != "option":
            continue
        flag = max(parameter.opts, key=len)
        if isinstance(value, bool):
            words.append(flag if value else max(parameter.secondary_opts, key=len))
        elif isinstance(value, list | tuple):
            for item in value:
                words += [flag, str(item)]
        else:
            words += [flag, str(value)]
    return words
