"""One recipe per seed method: each module reads like the method section of its paper.

Installed as `vlmtrace.recipes`, so `vlmtrace recipe NAME` works from any directory. A recipe
module defines:

    DESCRIPTION: str                     one line for `vlmtrace recipe list`
    run(vlm, samples, **options) -> xarray.Dataset
    default_samples(vlm, n, seed) -> list[Sample]   its synthetic data on the organisms
    DEFAULT_MODEL: str                   the shipped organism it runs on by default
    ORGANISMS: tuple[str, ...]           the shipped organisms it runs on (tested at n = 8)
    NEEDS: Needs                         what a sample must carry (replacement phrases, image pair, foil)
    READS_DATA: bool                     optional, default True: False for a recipe that runs only on
                                         its own scenes (`--data` is refused, naming OWN_DATA_ONLY_BECAUSE)
    INPAINTS: bool                       optional, default False: True for a recipe that adds an
                                         inpainted-image corruption given `Options.inpaint` (CLI
                                         `--inpaint`, refused by the others, which would ignore it)
    load_data(path, n, seed) -> list[Sample]   optional: how `--data` is read, when the recipe builds
                                         its samples from a data set's files itself (concepts: scenes)
    figures(ds, out_dir) -> list[Path]   PNGs (plotting stays out of `run`)
    summary(ds) -> str                   the headline finding, in a sentence or two

`describe(name)` reads a recipe's DESCRIPTION from its source, so `vlmtrace recipe list` needs
neither torch nor transformers. `fitting(recipe, samples)` splits samples into those a recipe
can corrupt and the reasons the others cannot be used; `usable(recipe, vlm, samples)` also leaves
out the samples the model answers wrongly, as the papers do, and tables what it left out:

    prepared = usable(recipe, vlm, samples)        # keep_wrong=True keeps wrong answers
    print(prepared.report())                        # read, kept, and a count per reason
    ds = recipe.run(vlm, prepared.samples)
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlmtrace.data.preparation import Prepared
    from vlmtrace.data.sample import Sample
    from vlmtrace.models.load import VLM


def names() -> list[str]:
    """Recipe module names, in the order of the seed papers."""
    found = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    order = [
        "visual_constraint",
        "multi_constraint",
        "blip_noise",
        "gn_vs_str",
        "notice",
        "information_flow",
        "universal_heads",
        "multimodal_edit",
        "concepts",
    ]
    return sorted(found, key=lambda n: (order.index(n) if n in order else len(order), n))


def get(name: str) -> ModuleType:
    """The recipe module `name`, or an error listing the recipes there are."""
    if name not in names():
        raise KeyError(f"no recipe {name!r}; choose one of {names()} (see `vlmtrace recipe list`).")
    return importlib.import_module(f"{__name__}.{name}")


def constant(name: str, variable: str, default: Any = None) -> Any:
    """A literal module constant of recipe `name`, read from its source without importing it (or torch)."""
    if name not in names():
        raise KeyError(f"no recipe {name!r}; choose one of {names()} (see `vlmtrace recipe list`).")
    tree = ast.parse((Path(__file__).parent / f"{name}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == variable for t in node.targets
        ):
            return ast.literal_eval(node.value)
    return default


def describe(name: str) -> str:
    """A recipe's DESCRIPTION, read from its source without importing it (or torch)."""
    return str(constant(name, "DESCRIPTION", ""))


def support_table(organisms: list[str]) -> str:
    """Recipe x shipped organism: which organism each recipe runs on (its `ORGANISMS`), as text."""
    width = max(len(n) for n in names()) + 2
    lines = [" " * width + "  ".join(organisms)]
    for name in names():
        runs = set(constant(name, "ORGANISMS", ()))
        cells = "  ".join(("yes" if o in runs else "-").center(len(o)) for o in organisms)
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines)


NO_FOIL = "no foil answer (the logit difference scores the answer against it)"
"""Why a sample without `Sample.foil` cannot be traced by a recipe that scores logit differences."""


@dataclass(frozen=True)
class Needs:
    """What a sample must carry for a recipe's corruptions to apply to it."""

    replacements: tuple[str, ...] = ()  # spans whose replacement phrase a corruption swaps in
    image_pair: bool = False  # semantic image pairs (SIP) need the counterfactual image
    foil: bool = False  # the logit difference scores the answer against a foil answer (`Sample.foil`)

    def missing(self, sample: Sample) -> str | None:
        """Why `sample` does not fit, or None when it does."""
        for span in self.replacements:
            if span not in sample.spans:
                return f"no span {span!r}"
            if span not in sample.replacements:
                return f"no replacement phrase for span {span!r}"
        if self.image_pair and sample.image_pair is None:
            return "no image_pair"
        if self.foil and not sample.foil:
            return NO_FOIL
        return None


def fitting(recipe: ModuleType, samples: list[Sample]) -> tuple[list[Sample], str | None]:
    """(samples the recipe can corrupt, a one-line note on those left out, or None)."""
    needs: Needs = getattr(recipe, "NEEDS", Needs())
    kept, reasons = [], {}
    for sample in samples:
        reason = needs.missing(sample)
        if reason is None:
            kept.append(sample)
        else:
            reasons.setdefault(reason, []).append(sample.id or "?")
    if not reasons:
        return kept, None
    parts = []
    for reason, ids in reasons.items():
        shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
        parts.append(f"{len(ids)} with {reason} ({shown})")
    left = len(samples) - len(kept)
    return (
        kept,
        f"left out {left} of {len(samples)} samples that {recipe.__name__.split('.')[-1]} cannot corrupt: "
        + "; ".join(parts),
    )


def usable(
    recipe: ModuleType,
    vlm: VLM,
    samples: list[Sample],
    *,
    keep_wrong: bool = False,
    max_batch: int = 64,
    backend: Any = None,
) -> Prepared:
    """The samples `recipe` can trace, and those left out by reason: what the CLI does before a run.

    Left out: samples the recipe cannot corrupt (`NEEDS`), and, unless `keep_wrong`, samples the
    model answers wrongly (`vlmtrace.data.correctness`: the papers trace only correct answers).
    `.report()` is the start-of-run table, `.fixes()` the way to keep each reason's samples.
    """
    from vlmtrace.data.correctness import WRONG, check_answers
    from vlmtrace.data.preparation import Prepared

    needs: Needs = getattr(recipe, "NEEDS", Needs())
    left_out: dict[str, list[str]] = {}
    fit = []
    for sample in samples:
        reason = needs.missing(sample)
        if reason is None:
            fit.append(sample)
        else:
            left_out.setdefault(reason, []).append(sample.id or "?")
    kept = fit
    if not keep_wrong and fit:
        checked = check_answers(vlm, fit, max_batch=max_batch, backend=backend)
        kept = checked.right
        if checked.wrong:
            left_out[WRONG] = [sample.id or "?" for sample, _ in checked.wrong]
    return Prepared(samples=kept, read=len(samples), left_out=left_out, origin="samples")


def draw(needs: Needs, draw_samples, n: int) -> list[Sample]:
    """The first `n` samples that meet `needs`, from `draw_samples(count)` drawing ever more.

    Synthetic families mix question kinds ("how many shapes" has no phrase to replace), so a
    recipe's default data asks for more than `n` and keeps those that fit, in order.
    """
    count = n
    while True:
        drawn = draw_samples(count)
        kept = [sample for sample in drawn if needs.missing(sample) is None]
        if len(kept) >= n or len(drawn) < count:
            return kept[:n]
        count *= 2
