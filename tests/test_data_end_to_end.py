"""`vlmtrace recipe NAME --data PATH` on datasets written in their published layouts, end to end.

Each test writes a small dataset exactly as its release unpacks (`tests/layouts.py`), runs a
recipe from the command line on a shipped organism, and opens the store it wrote: traced cells
must be there, not only a successful load. The organisms read real words through their byte
fallback; their answers are meaningless, the code paths are the real ones.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import layouts
import numpy as np
import pytest
from typer.testing import CliRunner

from vlmtrace.cli import app
from vlmtrace.results.dataset import open_result

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run_recipe(tmp_path, recipe: str, *options: str):
    out = tmp_path / f"{recipe}.zarr"
    result = CliRunner().invoke(app, ["recipe", recipe, "--out", str(out), "--n-samples", "8", *options])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return open_result(out), result.output


def traced(ds, variable: str) -> int:
    return int(np.isfinite(ds[variable].values).sum())


@pytest.fixture(scope="module")
def vqa_visual_constraint(tmp_path_factory):
    """visual_constraint on VQA v2 with the demonstrative finder: (store, CLI output)."""
    root = tmp_path_factory.mktemp("vqa")
    data = layouts.vqa_v2(root / "vqa")
    return run_recipe(root, "visual_constraint", "--data", str(data), "--span", "visual=@demonstrative")


def test_str_replacements_drawn_from_the_data_are_recorded_in_the_store(vqa_visual_constraint):
    ds, _ = vqa_visual_constraint
    recorded = ds.attrs["data"]["samples"]
    replacements = [s["replacements"]["visual"] for s in recorded]
    spans = [s["spans"]["visual"] for s in recorded]
    donors = [s["replaced_from"]["visual"] for s in recorded]
    assert (
        len(replacements) == 8
        and all(r != s for r, s in zip(replacements, spans, strict=True))
        and all(donors)
    )


def test_left_out_samples_are_tabled_before_the_run(vqa_visual_constraint):
    _, output = vqa_visual_constraint
    assert "data: read 10 questions, kept 8" in output and "left out because" in output


WRITERS = {
    "vqa/": layouts.vqa_v2,
    "gqa/": layouts.gqa,
    "CLEVR_v1.0/": layouts.clevr,
    "cocoqa/": layouts.coco_qa,
    "questions.jsonl": lambda root: layouts.table(root.parent / "table"),
    "iconqa_data/": layouts.iconqa,
    "finecops/annotations/test_coco_format.json": layouts.finecops,
    "data_constraints/multimodal_known.csv": lambda csv: layouts.basu(csv.parent),
    "zhang/GQA_val_correct_question_with_choose_ChooseAttr.csv": layouts.zhang_gqa,
    "Datasets/color_coco_qa.csv": layouts.palit_coco_qa,
    "Datasets/clevr_vqa_dataset_3.csv": layouts.palit_clevr,
    "svo/svo_probes.csv": layouts.svo_probes,
    "mit_states/": layouts.mit_states,
    "facial-emotion-expressions/": layouts.facial_expressions,
    "cooco/": layouts.cooco,
    "shapeworld/": layouts.shapeworld,
    "clevr-math/": layouts.clevr_math,
}


def readme_commands() -> list[list[str]]:
    """The `vlmtrace recipe ... --data` lines of the README's "Your own data" section."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text[text.index("### Your own data") :]
    block = section[section.index("```bash") : section.index("```", section.index("```bash") + 7)]
    return [
        shlex.split(line.split("#")[0])[2:]
        for line in block.splitlines()
        if line.startswith("vlmtrace recipe") and "--data" in line
    ]


SLOW = {"mit_states/", "facial-emotion-expressions/", "cooco/"}
"""Layouts whose README command runs `notice` (15-30 s each on 2 cores) like SVO-Probes' does: the same
code path, run with `-m slow`; `tests/test_semantic_pair_loaders.py` traces each from the CLI cheaply."""


def readme_cases() -> list:
    return [
        pytest.param(c, marks=pytest.mark.slow) if c[c.index("--data") + 1] in SLOW else c
        for c in readme_commands()
    ]


@pytest.mark.parametrize("command", readme_cases(), ids=lambda c: f"{c[0]}:{c[c.index('--data') + 1]}")
def test_every_readme_data_command_writes_a_store_with_traced_cells(tmp_path, command):
    recipe, rest = command[0], command[1:]
    data = rest[rest.index("--data") + 1]
    written = WRITERS[data](tmp_path / data.rstrip("/"))
    rest[rest.index("--data") + 1] = str(written)
    ds, output = run_recipe(tmp_path, recipe, *rest)
    assert ds.attrs["data"]["kept"] >= 8 and "data: read" in output
    values = [v for v in ("mlp", "block", "knockout", "encoder", "decoder") if v in ds.data_vars]
    assert values and all(traced(ds, v) > 0 for v in values)


def test_readme_covers_the_six_recipes_on_real_layouts():
    recipes = {command[0] for command in readme_commands()}
    assert recipes == {
        "visual_constraint",
        "notice",
        "information_flow",
        "gn_vs_str",
        "blip_noise",
        "multi_constraint",
    }


def test_information_flow_knocks_out_every_block_on_gqa(tmp_path):
    ds, _ = run_recipe(tmp_path, "information_flow", "--data", str(layouts.gqa(tmp_path / "gqa")))
    assert "object->question" in list(ds["block"].values) and traced(ds, "knockout") == ds["knockout"].size


def test_replace_option_sets_the_phrase_of_every_sample(tmp_path):
    ds, _ = run_recipe(
        tmp_path,
        "visual_constraint",
        "--data",
        str(layouts.vqa_v2(tmp_path / "vqa")),
        "--span",
        "visual=@demonstrative",
        "--replace",
        "visual=the red shape",
    )
    assert {s["replacements"]["visual"] for s in ds.attrs["data"]["samples"]} == {"the red shape"}


def test_readme_has_a_command_for_every_layout():
    assert {command[command.index("--data") + 1] for command in readme_commands()} == set(WRITERS)


def test_missing_images_are_left_out_before_the_run_and_counted(tmp_path):
    data = layouts.gqa(tmp_path / "gqa")
    for image_id in ("n16003", "n16007"):
        (data / "images" / f"{image_id}.jpg").unlink()
    ds, output = run_recipe(tmp_path, "information_flow", "--data", str(data))
    assert (
        ds.attrs["data"]["left_out"] == {"image missing": 2} and traced(ds, "knockout") == ds["knockout"].size
    )


def test_a_run_whose_every_image_is_missing_fails_naming_the_reason(tmp_path):
    data = layouts.gqa(tmp_path / "gqa")
    for picture in (data / "images").iterdir():
        picture.unlink()
    result = CliRunner().invoke(
        app, ["recipe", "information_flow", "--data", str(data), "--out", str(tmp_path / "x.zarr")]
    )
    assert result.exit_code != 0 and "image missing" in result.output


@pytest.fixture(scope="module")
def basu_visual_constraint(tmp_path_factory):
    """visual_constraint on Basu et al.'s multimodal_known.csv (no answers in the file): the store."""
    root = tmp_path_factory.mktemp("basu")
    data = layouts.basu(root / "data_constraints")
    return run_recipe(root, "visual_constraint", "--data", str(data), "--replace", "visual=this thing")[0]


def test_basu_questions_are_traced_on_the_models_own_answers(basu_visual_constraint):
    recorded = basu_visual_constraint.attrs["data"]["samples"]
    assert {s["answer_source"] for s in recorded} == {"the model's prediction"} and all(
        s["answer"] for s in recorded
    )


def test_basu_row_whose_constraint_is_not_in_its_question_is_left_out(basu_visual_constraint):
    assert basu_visual_constraint.attrs["data"]["left_out"] == {"no span 'visual' to replace": 1}
