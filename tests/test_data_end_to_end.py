"""`vlmtrace recipe NAME --data PATH` on datasets written in their published layouts, end to end.

The README's "Your own data" lines run here as written: `vlmtrace data example LAYOUT DIR` writes a
tiny copy of a layout (`vlmtrace.data.examples`), then the recipe line runs on a shipped organism, and
the test opens the store it wrote: traced cells must be there, not only a successful load. The other
tests write layouts through `tests/layouts.py` (the same writers, and variants only tests need). The
organisms read real words through their byte fallback; their answers are meaningless (so those runs
pass --keep-wrong), the code paths are the real ones. `layouts.gqa_shapes` holds the organisms' own
scenes in GQA's layout: they answer those, and a run leaves out the ones they get wrong.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import layouts
import numpy as np
import pytest
from typer.testing import CliRunner

import vlmtrace.recipes as registry
from vlmtrace.cli import app
from vlmtrace.data.correctness import WRONG
from vlmtrace.data.examples import EXAMPLES
from vlmtrace.data.preparation import prepare
from vlmtrace.engine.metrics import CLEAN_FLOOR
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
    return run_recipe(
        root, "visual_constraint", "--data", str(data), "--span", "visual=@demonstrative", "--keep-wrong"
    )


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


def readme_lines() -> list[str]:
    """The command lines of the README's "Your own data" section, in order (its bash blocks)."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text[text.index("### Your own data") :]
    section = section[: section.index("\n## ")]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        lines += [line for line in block.splitlines() if line.startswith("vlmtrace ")]
    return lines


def words(line: str) -> list[str]:
    """A README line as the shell splits it, comment dropped, without the leading `vlmtrace`."""
    return shlex.split(line, comments=True)[1:]


EXAMPLE_LINES = [line for line in readme_lines() if line.startswith("vlmtrace data example")]
RECIPE_LINES = [line for line in readme_lines() if line.startswith("vlmtrace recipe")]


def data_of(line: str) -> str:
    command = words(line)
    return command[command.index("--data") + 1]


def store_of(line: str) -> str:
    """The store a recipe line writes: its --out, else NAME.zarr in the current folder."""
    command = words(line)
    return command[command.index("--out") + 1] if "--out" in command else f"{command[1]}.zarr"


def examples_for(data: str) -> list[str]:
    """The README's `data example` lines that write the folder `data` is in."""
    return [line for line in EXAMPLE_LINES if Path(data).is_relative_to(Path(words(line)[-1]))]


def invoke(line: str):
    """Run one README line through the CLI, exactly as written (the shell's word splitting)."""
    result = CliRunner().invoke(app, words(line))
    assert result.exit_code == 0, f"{line}\n{result.output}{result.exception!r}"
    return result


SLOW = {"mit_states/", "facial-emotion-expressions/", "cooco/"}
"""Layouts whose README command runs `notice` (15-30 s each on 2 cores) like SVO-Probes' does: the same
code path, run with `-m slow`; `tests/test_semantic_pair_loaders.py` traces each from the CLI cheaply."""


def readme_cases() -> list:
    return [
        pytest.param(line, marks=pytest.mark.slow) if data_of(line) in SLOW else line for line in RECIPE_LINES
    ]


@pytest.mark.parametrize("line", readme_cases(), ids=lambda line: f"{words(line)[1]}:{data_of(line)}")
def test_every_readme_data_command_runs_as_written_on_the_shipped_examples(tmp_path, monkeypatch, line):
    """The example line(s) that write its data, then the recipe line itself, verbatim, in one folder:
    the store holds at least 8 samples (the default --n-samples) and traced cells, and no lock file
    is left behind."""
    monkeypatch.chdir(tmp_path)
    for example in examples_for(data_of(line)):
        invoke(example)
    output = invoke(line).output
    ds = open_result(tmp_path / store_of(line))
    assert ds.attrs["data"]["kept"] >= 8 and "data: read" in output
    values = [v for v in ("mlp", "block", "knockout", "encoder", "decoder") if v in ds.data_vars]
    assert values and all(traced(ds, v) > 0 for v in values)
    assert not list(tmp_path.rglob("*.lock"))  # a finished run leaves its store, not its locks


def test_the_example_block_runs_as_written_and_every_printed_path_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    printed = [word for line in EXAMPLE_LINES for word in re.findall(r"--data (\S+)", invoke(line).output)]
    assert len(printed) >= len(EXAMPLE_LINES) and all(Path(path).exists() for path in printed)


def test_every_recipe_line_reads_data_that_an_example_line_writes():
    assert all(len(examples_for(data_of(line))) == 1 for line in RECIPE_LINES)


def test_the_readme_writes_an_example_of_every_layout_and_reads_each():
    written = {words(line)[2]: words(line)[3] for line in EXAMPLE_LINES}
    read = {data_of(line) for line in RECIPE_LINES}
    assert set(written) == set(EXAMPLES) and all(
        any(Path(data).is_relative_to(Path(folder)) for data in read) for folder in written.values()
    )


def test_the_readme_data_block_runs_in_one_folder_without_two_runs_writing_one_store():
    """Distinct stores, and no store's figure folder (NAME/) is a data folder the block reads."""
    stores = [store_of(line) for line in RECIPE_LINES]
    folders = {Path(words(line)[-1]) for line in EXAMPLE_LINES}
    assert len(set(stores)) == len(stores) and not {Path(s).with_suffix("") for s in stores} & folders


def test_readme_runs_every_recipe_that_reads_data_on_real_layouts():
    recipes = {words(line)[1] for line in RECIPE_LINES}
    assert recipes == {
        "visual_constraint",
        "notice",
        "information_flow",
        "gn_vs_str",
        "blip_noise",
        "multi_constraint",
        "concepts",
    }


def test_information_flow_knocks_out_every_block_on_gqa(tmp_path):
    ds, _ = run_recipe(
        tmp_path, "information_flow", "--data", str(layouts.gqa(tmp_path / "gqa")), "--keep-wrong"
    )
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
        "--keep-wrong",
    )
    assert {s["replacements"]["visual"] for s in ds.attrs["data"]["samples"]} == {"the red shape"}


def test_missing_images_are_left_out_before_the_run_and_counted(tmp_path):
    data = layouts.gqa(tmp_path / "gqa")
    for image_id in ("n16003", "n16007"):
        (data / "images" / f"{image_id}.jpg").unlink()
    ds, output = run_recipe(tmp_path, "information_flow", "--data", str(data), "--keep-wrong")
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


@pytest.fixture(scope="module")
def shapes_gqa(tmp_path_factory) -> Path:
    """GQA's layout holding the organisms' own scenes; scenes 0 and 2 carry another city (mislabelled)."""
    return layouts.gqa_shapes(tmp_path_factory.mktemp("shapes") / "gqa")


MISLABELLED = {"gqa-00", "gqa-02", "gqa-20", "gqa-22"}  # scenes 0 and 2: fact, multi (`layouts.gqa_shapes`)


@pytest.fixture(scope="module")
def flow_on_shapes(tmp_path_factory, shapes_gqa):
    """information_flow at n = 8 on the organisms' scenes, by default: (store, CLI output)."""
    return run_recipe(tmp_path_factory.mktemp("flow"), "information_flow", "--data", str(shapes_gqa))


def test_wrongly_answered_samples_are_left_out_and_counted_in_the_table_before_the_run(flow_on_shapes):
    _, output = flow_on_shapes
    row = re.search(r"answered wrongly \(.*\)\s+(\d+)\s+(.*)", output)
    assert "kept 8" in output and row and int(row[1]) == 4 and set(row[2].split(", ")) < MISLABELLED


def test_the_store_holds_only_correctly_answered_samples_and_counts_those_left_out(flow_on_shapes):
    ds, _ = flow_on_shapes
    assert (
        ds.sizes["sample"] == 8
        and not MISLABELLED & set(ds["sample"].values)
        and ds.attrs["samples"]["left_out"] == {WRONG: 4}
        and ds.attrs["data"]["left_out"] == {WRONG: 4}
    )


def test_keep_wrong_traces_them_without_a_relative_change_below_the_clean_floor(tmp_path, shapes_gqa):
    ds, output = run_recipe(tmp_path, "information_flow", "--data", str(shapes_gqa), "--keep-wrong")
    wrong = [s for s in ds["sample"].values if s in MISLABELLED]  # the first 8 hold 3 of them
    right = [s for s in ds["sample"].values if s not in MISLABELLED]
    assert len(wrong) == 3 and float(ds["clean"].sel(sample=wrong).max()) < CLEAN_FLOOR
    relative = ds["relative"]
    assert relative.sel(sample=wrong).isnull().all() and relative.sel(sample=right).notnull().all()
    assert f"5 of 8 samples with clean P(answer) >= {CLEAN_FLOOR:g}" in output


# What each recipe needs marked in the organisms' questions, and the organism it runs on
SHAPES_RUNS = {
    "visual_constraint": ("shapes-llava", ["visual=the \\w+ shape"]),
    "multi_constraint": ("shapes-llava", ["visual=the \\w+ shape", "textual=year \\d+"]),
    "blip_noise": ("shapes-blip", []),
    "gn_vs_str": ("shapes-llava", ["visual=the \\w+ shape"]),
    "notice": ("shapes-llava", ["visual=the \\w+ shape"]),
    "information_flow": ("shapes-llava", []),
    "universal_heads": ("shapes-qwen", ["visual=the \\w+ shape"]),
}


@pytest.fixture(scope="module")
def organisms() -> dict:
    import vlmtrace as vt

    return {name: vt.load(name) for name in ("shapes-llava", "shapes-blip", "shapes-qwen")}


@pytest.mark.parametrize("name", SHAPES_RUNS)
def test_every_recipe_leaves_out_the_samples_the_model_answers_wrongly_by_default(
    name, organisms, shapes_gqa
):
    """The CLI's data step for each recipe (its needs, spans, object regions), without the sweep."""
    model, spans = SHAPES_RUNS[name]
    recipe = registry.get(name)
    regions = getattr(recipe, "OBJECT_REGIONS", False)
    prepared = prepare(organisms[model], shapes_gqa, needs=recipe.NEEDS, n=8, spans=spans, regions=regions)
    scenes = {sample.split("-")[1][0] for sample in prepared.left_out[WRONG]}  # scene of each question id
    assert len(prepared.samples) == 8 and scenes == {"0", "2"} and "answered wrongly" in prepared.report()


def test_clevr_object_regions_block_a_few_image_tokens_not_the_whole_image(tmp_path):
    ds, _ = run_recipe(
        tmp_path, "information_flow", "--data", str(layouts.clevr(tmp_path / "CLEVR_v1.0")), "--keep-wrong"
    )
    keys = ds["key_blocked"].sum("key_position")
    objects, image = keys.sel(block="object->question"), keys.sel(block="image->question")
    assert ds.sizes["sample"] == 8 and bool((objects >= 1).all()) and bool((objects <= image // 4).all())


NOTHING_LEFT = {  # a run that keeps no sample, and the way out its error must name
    "no span": (["visual_constraint", "--span", "visual=zebra", "--keep-wrong"], layouts.vqa_v2, "--span"),
    "no STR phrase": (  # every span is "What": no other phrase to draw
        ["visual_constraint", "--span", "visual=What", "--keep-wrong"],
        layouts.vqa_v2,
        "--replace",
    ),
    "wrong answers": (["information_flow"], layouts.gqa, "--keep-wrong"),
    "no foil": (  # a phrase given with --replace has no answer for the logit difference to score against
        ["gn_vs_str", "--span", "visual=@object", "--replace", "visual=the thing", "--keep-wrong"],
        layouts.clevr,
        "leave out --replace",
    ),
}


@pytest.mark.parametrize("case", NOTHING_LEFT)
def test_a_run_that_keeps_no_sample_names_the_way_out_of_each_reason(tmp_path, case):
    (recipe, *options), write, fix = NOTHING_LEFT[case]
    data = write(tmp_path / "data")
    out = tmp_path / "x.zarr"
    result = CliRunner().invoke(app, ["recipe", recipe, "--data", str(data), *options, "--out", str(out)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "kept 0" in text and "How to keep them:" in text and fix in text


def test_gqa_without_scene_graphs_says_before_the_run_which_file_gives_object_regions(tmp_path):
    data = layouts.gqa(tmp_path / "gqa")
    (data / "testdev_sceneGraphs.json").unlink()
    ds, output = run_recipe(tmp_path, "information_flow", "--data", str(data), "--keep-wrong")
    before_the_run = " ".join(output[: output.index("store:")].split())
    assert "8 of 8 kept samples have no object region" in before_the_run
    assert "_sceneGraphs.json beside the questions" in before_the_run
    assert "object->question skipped for 8 of 8 samples" in " ".join(output.split())
