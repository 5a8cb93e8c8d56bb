"""`vlmtrace zoo`: list, retrain and evaluate the shipped model organisms.

A thin shell over `vlmtrace.models.zoo`; everything it prints comes from there. The zoo
(which needs torch) is imported inside each command, so `vlmtrace --help` stays fast.

    vlmtrace zoo list
    vlmtrace zoo train shapes-llava --out runs/shapes-llava      # bit-identical to the shipped
    vlmtrace zoo eval shapes-llava --n-samples 400
    # ... last line: zoo_eval shapes-llava visual=0.993 fact=1.000 multi=1.000
    vlmtrace zoo eval planted-llava --n-samples 400
    # ... last line: zoo_eval planted-llava task=1.000 interchange_min=1.000 strictness_max=0.000

Planted organisms (`vlmtrace.models.zoo.planted`) are scored by their mechanism instead:
task accuracy, interchange accuracy of each planted component, strictness of the others.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .hub import organism_names

app = typer.Typer(help="Model organisms: small trained VLMs shipped with vlmtrace.")


def _in_catalogue(name: str) -> str:
    """Any organism with a spec, shipped or not yet (training needs no weights)."""
    from vlmtrace.models import zoo

    if name not in zoo.ORGANISMS and name not in zoo.PLANTED:
        names = ", ".join([*zoo.ORGANISMS, *zoo.PLANTED])
        raise typer.BadParameter(f"no organism named {name!r}; choose one of {names}")
    return name


@app.command("list")
def list_organisms() -> None:
    """The shipped organisms, with their held-out accuracies (planted: their mechanism's figures)."""
    from vlmtrace.models import zoo

    for name, spec in [*zoo.ORGANISMS.items(), *zoo.PLANTED.items()]:
        record_path = zoo.organism_dir(name) / "organism.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        if "figures" in record:
            scores = _planted_line(record["figures"])
        else:
            accuracies = record.get("held_out_accuracy", {})
            scores = " ".join(f"{k}={v:.3f}" for k, v in accuracies.items()) or "(not trained yet)"
        parameters = zoo.parameter_count(zoo.organism_dir(name))
        typer.echo(f"{name}  {spec.architecture}  {parameters:,} params  {scores}")
        typer.echo(f"    {spec.description}")


def _planted_line(figures: dict) -> str:
    interchange = min(figures["interchange"].values())
    strictness = max(figures["strictness"].values())
    return f"task={figures['task']:.3f} interchange_min={interchange:.3f} strictness_max={strictness:.3f}"


@app.command()
def train(
    name: Annotated[str, typer.Argument(help="organism name", callback=_in_catalogue)],
    out: Annotated[Path | None, typer.Option(help="output directory", show_default="./NAME")] = None,
    seed: Annotated[int | None, typer.Option(help="training seed", show_default="the spec's")] = None,
    steps: Annotated[int | None, typer.Option(help="training steps", show_default="the spec's")] = None,
) -> None:
    """Retrain an organism from its seed (bit-identical to the shipped weights by default)."""
    folder = out or Path(name)
    blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:  # found before minutes of training, not after
        raise typer.BadParameter(
            f"{blocker} is a file, so the organism cannot be written to the folder {folder}; choose another "
            "--out.",
            param_hint="--out",
        )
    from vlmtrace.models import zoo

    if name in zoo.PLANTED:
        path = zoo.train_planted(name, folder, seed=seed, steps=steps)
        record = json.loads((path / "organism.json").read_text())
        scores = _planted_line(record["figures"])
        typer.echo(f"trained {name} in {record['train_seconds']:.0f} s -> {path}  ({scores})")
        return
    path = zoo.train(name, folder, seed=seed, steps=steps, progress=True)
    record = json.loads((path / "organism.json").read_text())
    scores = " ".join(f"{k}={v:.3f}" for k, v in record["held_out_accuracy"].items())
    typer.echo(f"trained {name} in {record['train_seconds']:.0f} s -> {path}  ({scores})")


@app.command("eval")
def evaluate(
    name: Annotated[str, typer.Argument(help="organism name or a directory `train` wrote")],
    n_samples: Annotated[
        int, typer.Option("--n-samples", "--n", min=1, help="held-out questions (pairs) per family")
    ] = 400,
    per_position: Annotated[
        bool,
        typer.Option(
            help="Planted: also swap every unassigned (component, position) alone, as a trace does."
        ),
    ] = True,
) -> None:
    """Held-out accuracy per question family (planted: task, interchange, strictness); the last
    line is machine-readable."""
    if name not in organism_names() and not Path(name).is_dir():
        raise typer.BadParameter(
            f"{name!r} is neither an organism ({', '.join(organism_names())}) nor a directory",
            param_hint="NAME",
        )
    from vlmtrace.models import zoo

    model, processor = zoo.load_organism(name)
    mechanism_file = (zoo.organism_dir(name) if name in zoo.PLANTED else Path(name)) / "mechanism.json"
    if mechanism_file.exists():
        from vlmtrace.models.zoo.interchange import measure
        from vlmtrace.models.zoo.mechanism import Mechanism

        mechanism = Mechanism.from_json(mechanism_file)
        figures = measure(model, processor.tokenizer, mechanism, pairs=n_samples, per_position=per_position)
        typer.echo(f"task accuracy {figures['task']:.3f} on {n_samples} held-out questions")
        for variable, value in figures["interchange"].items():
            every = figures["interchange_all_pairs"][variable]
            typer.echo(f"interchange {variable}: {value:.3f} (all pairs {every:.3f})")
        worst = max(figures["strictness"], key=figures["strictness"].get)
        typer.echo(
            f"strictness: worst unassigned component {worst} changes {figures['strictness'][worst]:.3f}"
        )
        if per_position:
            cell = figures["strictness_per_position"]
            typer.echo(
                f"strictness per position: worst cell {cell['at']} changes {cell['max']:.3f} "
                f"(of {cell['cells']} cells)"
            )
        typer.echo(f"zoo_eval {name} {_planted_line(figures)}")
        return
    accuracies = zoo.held_out_accuracy(model, processor, n=n_samples, progress=True)
    typer.echo(" ".join(f"{k}={v:.3f}" for k, v in accuracies.items()))
    typer.echo(
        f"zoo_eval {name} visual={accuracies['visual']:.3f} fact={accuracies['fact']:.3f} "
        f"multi={accuracies['multi']:.3f}"
    )
