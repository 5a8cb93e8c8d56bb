"""`vlmtrace recipe NAME`: run one seed method end to end, store it, draw it, summarise it."""

from __future__ import annotations

import math
import os
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError
from ..options import Options

CLUSTER_PANEL = "Cluster: the shards as one job array (vlmtrace cluster status / resume)"

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
        size = float(number) * UNITS[unit]
    except ValueError:
        size = math.nan
    if not math.isfinite(size) or size <= 0:
        raise typer.BadParameter(f"{text!r}: use a size such as 20GB or 512MiB.", param_hint="--max-memory")
    return size


def recipe(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Recipe name, or 'list' to list them.")],
    model: Annotated[str | None, typer.Option(help="HF repo id, directory or organism name.")] = None,
    data: Annotated[Path | None, typer.Option(help="A dataset file or directory (see README).")] = None,
    n_samples: Annotated[int, typer.Option(min=1, help="Samples to trace.")] = 8,
    out: Annotated[Path | None, typer.Option(help="Zarr store to write (default: NAME.zarr).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of data sampling and noise.")] = 0,
    max_batch: Annotated[int, typer.Option(min=1, help="Rows per batched forward.")] = 64,
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
        int | None,
        typer.Option(
            min=1,
            help="Patch only the top-K cells by attribution-patching estimate; 3x the cells you "
            "will read (e.g. 15 for a top 5), best with --screen-method 'atp*'.",
        ),
    ] = None,
    screen_method: Annotated[
        str,
        typer.Option(
            help="How --screen estimates: atp (gradient at the run), ig (integrated gradients, "
            "better where P(answer) saturates), or AtP*'s fixes: atp+qk (exact next-layer softmax), "
            "atp+graddrop, 'atp*' (both; quote it in a shell).",
        ),
    ] = "atp",
    reuse_prefix: Annotated[
        bool,
        typer.Option(
            help="Skip the layers and positions below each cell's first patch (same results; local runs)."
        ),
    ] = False,
    span: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=PATTERN: mark a constraint span in each question of --data: a phrase or regex (first "
            "whole-word match) or @demonstrative, @year, @number, @object. Repeatable."
        ),
    ] = None,
    replace_phrase: Annotated[
        list[str] | None,
        typer.Option(
            "--replace",
            help="NAME=PHRASE: the replacement of span NAME (ReplaceSpan). Without it, a phrase of the same "
            "token count with another answer is drawn from the data (STR). Repeatable.",
        ),
    ] = None,
    prompt_template: Annotated[
        str | None,
        typer.Option(
            help="Prompt for --data questions, with {question} and {image}, e.g. 'USER: {image}\n{question} "
            "ASSISTANT:'. Default: the processor's chat template, else the family's documented prompt."
        ),
    ] = None,
    keep_wrong: Annotated[
        bool,
        typer.Option(
            help="Trace the samples the model answers wrongly too. By default they are left out and "
            "counted, as the papers do: the model's top next token must be the answer's first token.",
        ),
    ] = False,
    inpaint: Annotated[
        str | None,
        typer.Option(
            help="Add counterfactual inpainting (the object region painted over) as an image corruption in "
            "notice and gn_vs_str: opencv (offline, deterministic) or a diffusers inpainting pipeline's id.",
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="torch CPU threads. Default: $VLMTRACE_THREADS, else 1 for a shipped organism "
            "(tiny matrices gain nothing from more), else torch's default.",
        ),
    ] = None,
    # --- cluster submission (vlmtrace.cli.cluster): the jobs run this command with --shard I/N ---
    cluster: Annotated[
        str | None,
        typer.Option(
            rich_help_panel=CLUSTER_PANEL,
            help="slurm or local: submit --shards N jobs (one SLURM job array, through submitit) instead "
            "of running here; `vlmtrace cluster status OUT` watches them, `vlmtrace cluster resume OUT` "
            "resubmits the stopped ones.",
        ),
    ] = None,
    shards: Annotated[
        int | None,
        typer.Option(
            min=1, rich_help_panel=CLUSTER_PANEL, help="With --cluster: how many jobs share the sweep."
        ),
    ] = None,
    partition: Annotated[
        str | None,
        typer.Option(rich_help_panel=CLUSTER_PANEL, help="With --cluster slurm: sbatch --partition."),
    ] = None,
    gpus_per_task: Annotated[
        int | None,
        typer.Option(
            min=0, rich_help_panel=CLUSTER_PANEL, help="With --cluster slurm: sbatch --gpus-per-task."
        ),
    ] = None,
    time_limit: Annotated[
        str | None,
        typer.Option(
            "--time",
            rich_help_panel=CLUSTER_PANEL,
            help="With --cluster: each job's time limit (SLURM's forms, e.g. 4:00:00).",
        ),
    ] = None,
    mem: Annotated[
        str | None,
        typer.Option(rich_help_panel=CLUSTER_PANEL, help="With --cluster slurm: sbatch --mem, e.g. 32G."),
    ] = None,
    sbatch: Annotated[
        list[str] | None,
        typer.Option(
            rich_help_panel=CLUSTER_PANEL,
            help="With --cluster slurm: any other sbatch option as KEY=VALUE, e.g. account=lab. Repeatable.",
        ),
    ] = None,
) -> None:
    from .. import recipes as registry

    if name == "list":
        from .hub import organism_names

        for recipe_name in registry.names():
            typer.echo(f"{recipe_name:<20} {registry.describe(recipe_name)}")
        typer.echo("\nWhich shipped organism each recipe runs on (--model; any supported family runs too):")
        typer.echo(registry.support_table([o for o in organism_names() if o.startswith("shapes-")]))
        return
    if name not in registry.names():
        raise typer.BadParameter(f"no recipe {name!r}; choose one of {registry.names()}.", param_hint="NAME")
    out = check_out(out or Path(f"{name}.zarr"), overwrite=overwrite)
    submitting = cluster is not None or shards is not None  # jobs run this command; no store here
    if os.path.lexists(out) and not overwrite and not submitting:  # only the finishing stage is left
        finish_from_store(out, name=name, command=command_of(ctx))
        return
    if data is not None and not data.exists():
        raise typer.BadParameter(
            f"{data} does not exist; give a dataset file or folder.", param_hint="--data"
        )
    if data is not None and not registry.constant(name, "READS_DATA", True):  # refused before any loading
        why = registry.constant(name, "OWN_DATA_ONLY_BECAUSE", "its samples need what only those scenes hold")
        raise typer.BadParameter(
            f"recipe {name} runs on the organisms' own scenes and reads no --data: {why}. Leave out --data.",
            param_hint="--data",
        )
    if inpaint is not None and not registry.constant(name, "INPAINTS", False):
        takers = " and ".join(n for n in registry.names() if registry.constant(n, "INPAINTS", False))
        raise typer.BadParameter(
            f"recipe {name} adds no inpainted-image corruption, so --inpaint would be ignored; it applies "
            f"to {takers}. Leave out --inpaint.",
            param_hint="--inpaint",
        )
    if data is None and (span or replace_phrase):  # the recipe's own scenes carry their own spans and phrases
        given = "--span" if span else "--replace"
        raise typer.BadParameter(
            f"{given} applies to your own data and would be ignored: the recipe's own scenes declare their "
            "spans and replacement phrases. Add --data PATH, or leave out --span / --replace.",
            param_hint=given,
        )
    # Everything below the checks imports torch; the checks above answer at once.
    from ..models.load import load
    from ..results.dataset import assemble
    from .hub import check_model_source, check_pipeline_source

    module = registry.get(name)
    model_name = model or module.DEFAULT_MODEL
    check_organism(module, name, model_name)
    if not remote:
        from ..models.load import NotAModelError, check_device

        try:
            check_device(device)
        except NotAModelError as error:
            raise typer.BadParameter(str(error), param_hint="--device") from None
    own_loader = getattr(module, "load_data", None)  # a recipe that builds its samples from the files
    read_data = (lambda path, count: own_loader(path, count, seed)) if own_loader else None
    if data is not None:  # read (and check) the data before any weights load
        from ..data.loaders import load_dataset

        if read_data is not None:
            samples = read_data(data, n_samples)
        else:  # missing images are marked, then left out by prepare and counted
            samples = load_dataset(data, n=n_samples, missing_images="mark")
    check_model_source(model_name)
    if inpaint is not None:  # the pipeline loads only when the recipe reaches its inpainting sweep
        check_pipeline_source(inpaint)
    if submitting:  # checked as far as can be without the weights: the jobs do the rest
        from .cluster import submit_recipe_command

        submit_recipe_command(ctx, out=out)
        return
    set_threads(threads, model_name)
    quiet_transformers()
    options = Options(
        max_batch=max_batch,
        max_memory=parse_bytes(max_memory),
        parts=out.with_suffix(".parts"),  # one resumable store per sub-sweep: rerun to resume
        shard=parse_shard(shard),
        overwrite=overwrite,
        screen=screen,
        screen_method=screen_method,
        reuse_prefix=reuse_prefix,
        inpaint=inpaint,
    )
    backend = None
    if remote:  # the client only plans and encodes: no weights needed here
        from ..remote import backend as remote_backend
        from ..remote import skeleton

        vlm = skeleton(model_name)
        backend = remote_backend(vlm, host=host)
        backend.check_reachable()  # a server that is not there is named now, not at the first chunk
    else:
        vlm = load(model_name, device=device)
    if data is None:  # the recipe's own scenes; those it cannot corrupt or the model gets wrong are left out
        prepared = registry.usable(
            module,
            vlm,
            module.default_samples(vlm, n=n_samples, seed=seed),
            keep_wrong=keep_wrong,
            max_batch=max_batch,
            backend=backend,
        )
        typer.echo(prepared.report())
        if not prepared.samples:
            raise DataMismatch(
                f"no sample of recipe {name}'s own data can be traced on {model_name}:\n{prepared.report()}\n"
                + (prepared.fixes() or "Give samples with what the recipe needs (README, Recipes).")
            )
    else:  # the model's prompts, spans, replacements, pairs; what cannot be traced is left out
        from ..data.preparation import prepare

        prepared = prepare(
            vlm,
            data,
            needs=getattr(module, "NEEDS", None),
            n=n_samples,
            spans=span or (),
            replace=replace_phrase or (),
            template=prompt_template,
            seed=seed,
            regions=getattr(module, "OBJECT_REGIONS", False),
            keep_wrong=keep_wrong,
            max_batch=max_batch,
            backend=backend,
            load=read_data,
        )
        typer.echo(prepared.report())
    samples, note = registry.fitting(module, prepared.samples)
    if note:
        typer.echo(note)
    if not samples:
        raise DataMismatch(
            f"none of the samples in {data} fits recipe {name} ({note}). Give samples with the spans, "
            "replacement phrases and image pairs it corrupts (README, Recipes)."
        )
    ds = module.run(vlm, samples, seed=seed, options=replace(options, backend=backend))
    # what was left out before the run, and why (wrong answers included), is kept with the results
    ds.attrs["samples"] = {
        "read": prepared.read,
        "kept": len(samples),
        "keep_wrong": keep_wrong,
        "left_out": {reason: len(ids) for reason, ids in prepared.left_out.items()},
    }
    if data is not None:  # which phrase replaced which, which image paired which: kept with the results
        ds.attrs["data"] = {"path": str(data), **prepared.provenance()}
        if "sample" in ds.dims:  # labels results split by (COOCO's relatedness level)
            ds = ds.assign_coords(prepared.coordinates(ds["sample"].values))
    if "done" in ds and not bool(ds["done"].all()):
        typer.echo(
            f"shard {shard} done: {int(ds['done'].sum())} of {ds['done'].size} (sample, part) results are in "
            f"{options.parts}. The last shard to finish assembles {out} and its figures."
        )
        return
    ds.attrs["command"] = command_of(ctx)  # what reproduces it; a rerun of it finishes the figures
    if not assemble(ds, out, overwrite=overwrite):  # shards that finish together assemble once
        typer.echo(f"store: {out} (already assembled by another shard, with equal values)")
        return
    finish(module, ds, out, command=command_of(ctx))


def finish(module, ds, out: Path, *, command: str) -> None:
    """The finishing stage: figures and report of a complete store, then the summary.

    Drawn from the store alone, so a run killed here (or out of disk space here) is finished
    by rerunning the same command, which finds the store complete (`finish_from_store`).
    """
    from ..presentation.report import write_report

    try:
        figures = module.figures(ds, out.with_suffix(""))
        summary = module.summary(ds)
        report = write_report(ds, out.with_suffix(".html"), summary=summary, figures=figures, command=command)
    except OSError as error:
        raise FinishingError(
            f"the store {out} is complete, but its figures and report could not be written "
            f"({error.strerror or error}{f': {error.filename}' if error.filename else ''}). Free space (or "
            "fix the folder's permissions) and rerun the same command: it draws them from the store, "
            "without the model."
        ) from None
    typer.echo(f"store: {out}")
    for figure in figures:
        typer.echo(f"figure: {figure}")
    typer.echo(f"report: {report}")
    typer.echo(summary)


class FinishingError(UserError):
    """A complete store whose figures or report could not be written."""


def same_run(command: str) -> str:
    """A recipe command without what does not change its result: where the store is (--out,
    the store found there), --overwrite, --shard and --threads."""
    kept, words = [], iter(shlex.split(command))
    for word in words:
        if word in ("--out", "--shard", "--threads"):
            next(words, None)
        elif word != "--overwrite":
            kept.append(word)
    return shlex.join(kept)


def finish_from_store(out: Path, *, name: str, command: str) -> None:
    """Rerunning the command that wrote the complete store `out`: draw its figures and report.

    A kill (or a full disk) in the finishing stage leaves a complete store; the same command
    then finishes that stage from it. Any other command is refused: the store is not its.
    """
    from .. import recipes as registry
    from ..results.dataset import open_result
    from ..results.store import StoreError

    try:
        ds = open_result(out)
    except StoreError as error:
        raise typer.BadParameter(
            f"{out} exists and cannot be read as a result ({error}). Pass --overwrite to replace it, or "
            "choose another --out.",
            param_hint="--out",
        ) from None
    written_by = str(ds.attrs.get("command", ""))
    if ds.attrs.get("recipe") != name or same_run(written_by) != same_run(command):
        raise typer.BadParameter(
            f"{out} exists, written by {written_by or 'another command'!r}; pass --overwrite to replace "
            "it, or choose another --out.",
            param_hint="--out",
        )
    typer.echo(f"{out} is complete (written by this command): drawing its figures and report.")
    finish(registry.get(name), ds, out, command=command)


class DataMismatch(UserError):
    """Samples that a recipe cannot corrupt (no replacement phrase, no image pair)."""


def check_out(out: Path, *, overwrite: bool) -> Path:
    """The store path, checked before any work: a .zarr name in a writable folder, holding
    nothing or a store vlmtrace wrote (which the same command finishes, or --overwrite replaces)."""
    if out.suffix != ".zarr":
        raise typer.BadParameter(
            f"{out}: name the store NAME.zarr (figures go to NAME/, the report to NAME.html).",
            param_hint="--out",
        )
    folder = out.parent.resolve()
    if not folder.is_dir():
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
        if blocker is not None:  # a path under a file: no folder can be created there
            raise typer.BadParameter(
                f"{blocker} is a file, so {out} cannot be written under it. Choose --out in an existing "
                f"folder (e.g. --out {out.name}, in the current one).",
                param_hint="--out",
            )
        raise typer.BadParameter(f"folder {folder} does not exist; create it first.", param_hint="--out")
    if not os.access(folder, os.W_OK):
        raise typer.BadParameter(
            f"folder {folder} is not writable; choose another --out.", param_hint="--out"
        )
    for beside, kind in ((out.with_suffix(""), "figures"), (out.with_suffix(".parts"), "sub-sweeps")):
        if beside.exists() and not beside.is_dir():  # found now, not after the sweep
            raise typer.BadParameter(
                f"{beside} is a file, but the run writes its {kind} into a folder of that name. Move the "
                "file, or choose another --out.",
                param_hint="--out",
            )
    if out.with_suffix(".html").is_dir():
        raise typer.BadParameter(
            f"{out.with_suffix('.html')} is a folder, but the run writes its report to a file of that name. "
            "Move the folder, or choose another --out.",
            param_hint="--out",
        )
    from ..results.store import StoreError, check_replaceable

    try:
        check_replaceable(out)  # a folder or file of the user's is never written over
    except StoreError as error:
        raise typer.BadParameter(str(error), param_hint="--out") from None
    return out


def check_organism(module, name: str, model: str) -> None:
    """A shipped organism that the recipe does not support is refused before it loads."""
    from .hub import organism_names

    if model in organism_names() and model not in module.ORGANISMS:
        raise typer.BadParameter(
            f"recipe {name} runs on {', '.join(module.ORGANISMS)}, not {model} (`vlmtrace recipe list` "
            "shows which organism each recipe runs on).",
            param_hint="--model",
        )


def set_threads(threads: int | None, model: str) -> int | None:
    """Cap torch's CPU threads: given, else $VLMTRACE_THREADS, else 1 for an organism.

    Measured on a busy 2-core machine (README, "Threads"): the organisms' 64-wide matrices
    gain nothing from a second thread and lose much when a core is shared.
    """
    from .hub import organism_names

    if threads is None:
        threads = environment_threads()
    if threads is None and model in organism_names():
        threads = 1
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return threads


class ThreadsError(UserError):
    """$VLMTRACE_THREADS that is not a number of threads."""


def environment_threads() -> int | None:
    """$VLMTRACE_THREADS as a number of threads, or None when it is unset or empty."""
    text = os.environ.get("VLMTRACE_THREADS", "").strip()
    if not text:
        return None
    try:
        threads = int(text)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ThreadsError(
            f"VLMTRACE_THREADS={text!r} is not a number of threads. Set it to a whole number of at least 1 "
            "(export VLMTRACE_THREADS=1), or unset it; --threads N overrides it for one run."
        )
    return threads


def quiet_transformers() -> None:
    """transformers' own "Loading weights" bar would interleave with vlmtrace's bars."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def command_of(ctx: typer.Context) -> str:
    """The command line that reproduces this run (options that differ from their defaults)."""
    words = ["vlmtrace", "recipe", ctx.params["name"]]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name == "name" or value is None or value == param.default or value is False:
            continue
        flag = max(param.opts, key=len)
        if isinstance(value, list | tuple):  # a repeatable option: one flag per value, none if empty
            for item in value:
                words += [flag, str(item)]
            continue
        words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)
