"""The command line is a thin shell over the API, tested in-process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import xarray as xr
from typer.testing import CliRunner

from vlmtrace.cli import app

runner = CliRunner()


def _text(result) -> str:
    """A command's output as one line of words (rich wraps error boxes at the terminal width)."""
    return " ".join(result.output.replace("│", " ").split())


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "recipe" in result.output and "zoo" in result.output


def test_recipe_list_names_each_recipe_with_a_description():
    import vlmtrace.recipes as registry

    result = runner.invoke(app, ["recipe", "list"])
    assert result.exit_code == 0
    for name in registry.names():
        assert name in result.output


def test_an_unknown_recipe_is_named_with_the_choices():
    result = runner.invoke(app, ["recipe", "no_such_recipe"])
    assert result.exit_code != 0
    assert "no recipe 'no_such_recipe'" in result.output


def test_shard_and_memory_options_parse_and_bad_values_name_the_form():
    import pytest
    import typer

    from vlmtrace.cli.recipe import parse_bytes, parse_shard

    assert parse_shard("1/4") == (1, 4)
    assert parse_bytes("20GB") == 20e9 and parse_bytes("512MiB") == 512 * 2**20
    with pytest.raises(typer.BadParameter, match="e.g. 0/2 and 1/2"):
        parse_shard("4/4")
    with pytest.raises(typer.BadParameter, match="such as 20GB"):
        parse_bytes("lots")


def test_sharding_without_a_shared_store_is_refused():
    import pytest

    import vlmtrace as vt

    with pytest.raises(ValueError, match="sharding needs a store"):
        vt.Options(shard=(0, 2))


# A fresh `python -c` / `python -m` would put the working directory (the repository root) first
# on sys.path and import the source tree, which lacks `vlmtrace.recipes` (installed from recipes/);
# PYTHONSAFEPATH keeps these processes on the installed package, as a user's are.
INSTALLED = {"PYTHONSAFEPATH": "1"}


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`vlmtrace ARGS` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "vlmtrace.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **INSTALLED, **(env or {})},
        timeout=300,
    )


def test_help_and_recipe_list_import_neither_torch_nor_transformers():
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from vlmtrace.cli import app\n"
        "for args in (['--help'], ['recipe', 'list'], ['recipe', '--help'], ['zoo', '--help'],"
        " ['data', 'example', '--help']):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
        "print(sorted(m for m in ('torch', 'transformers', 'nnsight') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **INSTALLED},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_user_error_prints_one_short_paragraph_and_exits_2():
    result = runner.invoke(app, ["plot", "no_such_store.zarr"])
    assert result.exit_code == 2
    assert "no result store at no_such_store.zarr" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3


def test_debug_shows_a_user_errors_traceback():
    from vlmtrace.results.dataset import StoreError

    result = runner.invoke(app, ["--debug", "plot", "no_such_store.zarr"])
    assert isinstance(result.exception, StoreError)


def test_a_bug_keeps_its_traceback(tmp_path):
    store = tmp_path / "broken.zarr"  # claims a recipe but holds none of its variables
    xr.Dataset({"x": ("a", [1.0])}, attrs={"recipe": "multi_constraint"}).to_zarr(
        store, zarr_format=2, consolidated=True
    )
    result = runner.invoke(app, ["plot", str(store)])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)


def test_an_uncached_model_with_the_hub_offline_fails_at_once_naming_the_ways_around(tmp_path):
    done = _run(
        "recipe",
        "visual_constraint",
        "--model",
        "nobody/no-such-vlm-in-any-cache",
        "--out",
        str(tmp_path / "x.zarr"),
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert done.returncode == 2, done.stderr
    for hint in ("HF_HUB_OFFLINE", "--remote", "HF_HOME", "shapes-llava"):
        assert hint in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unreachable_hub_fails_at_once_naming_the_ways_around(tmp_path):
    done = _run(
        "recipe",
        "visual_constraint",
        "--model",
        "nobody/no-such-vlm-in-any-cache",
        "--out",
        str(tmp_path / "x.zarr"),
        env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"},
    )
    assert done.returncode == 2, done.stderr
    assert "unreachable" in done.stderr and "--remote" in done.stderr and "Traceback" not in done.stderr


def test_an_uncached_inpainting_pipeline_fails_before_any_model_loads(tmp_path):
    done = _run(
        "recipe",
        "notice",
        "--inpaint",
        "nobody/no-such-inpainting-pipeline",
        "--out",
        str(tmp_path / "x.zarr"),
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert done.returncode == 2, done.stderr
    assert "inpainting pipeline 'nobody/no-such-inpainting-pipeline'" in done.stderr
    assert "--inpaint opencv" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "x.parts").exists()


def test_inpaint_is_refused_by_a_recipe_that_would_ignore_it(tmp_path):
    result = runner.invoke(
        app, ["recipe", "visual_constraint", "--inpaint", "opencv", "--out", str(tmp_path / "x.zarr")]
    )
    assert result.exit_code == 2, result.output
    assert "would be ignored" in result.output and "gn_vs_str and notice" in result.output


def test_a_misspelt_organism_is_answered_with_the_one_it_probably_means(tmp_path):
    result = runner.invoke(
        app, ["recipe", "visual_constraint", "--model", "shapes-lava", "--out", str(tmp_path / "x.zarr")]
    )
    assert result.exit_code == 2, result.output
    assert "did you mean 'shapes-llava'?" in result.output
    for organism in ("shapes-blip", "shapes-llava", "shapes-qwen"):
        assert organism in result.output
    assert "Hugging Face Hub" not in result.output  # answered at once, without a hub lookup


def test_recipe_list_prints_which_organism_each_recipe_runs_on():
    from vlmtrace import recipes as registry

    result = runner.invoke(app, ["recipe", "list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(
        i for i, line in enumerate(lines) if line.split() == ["shapes-blip", "shapes-llava", "shapes-qwen"]
    )
    rows = {line.split()[0]: line.split()[1:] for line in lines[header + 1 :] if line.strip()}
    assert list(rows) == registry.names()
    for name, cells in rows.items():  # the table agrees with each recipe's imported ORGANISMS
        runs = registry.get(name).ORGANISMS
        assert cells == ["yes" if o in runs else "-" for o in ("shapes-blip", "shapes-llava", "shapes-qwen")]


def test_span_without_data_is_refused_instead_of_ignored(tmp_path):
    out = str(tmp_path / "x.zarr")
    result = runner.invoke(app, ["recipe", "visual_constraint", "--span", "visual=@object", "--out", out])
    said = " ".join(result.output.replace("│", " ").split())  # rich wraps the message in a box
    assert result.exit_code == 2 and "would be ignored" in said and "Add --data PATH" in said
    assert not (tmp_path / "x.zarr").exists()


def test_the_reproduce_command_repeats_each_value_of_a_repeatable_option_and_omits_empty_ones():
    import click

    from vlmtrace.cli.recipe import command_of

    def context(**values):
        params = [click.Option(["--span"], multiple=True), click.Option(["--n-samples"], default=8)]
        ctx = click.Context(click.Command("recipe", params=params))
        ctx.params = {"name": "notice", **values}
        return ctx

    assert command_of(context(span=(), n_samples=8)) == "vlmtrace recipe notice"
    assert command_of(context(span=("visual=@object", "textual=@year"), n_samples=3)) == (
        "vlmtrace recipe notice --span visual=@object --span textual=@year --n-samples 3"
    )


def test_a_missing_data_path_is_refused_before_the_model_is_looked_up(tmp_path):
    result = runner.invoke(
        app,
        ["recipe", "visual_constraint", "--model", "nobody/x", "--data", str(tmp_path / "none.jsonl")]
        + ["--out", str(tmp_path / "x.zarr")],
    )
    squashed = "".join(_text(result).split())  # rich may wrap the long path mid-word
    assert result.exit_code == 2 and "none.jsonldoesnotexist" in squashed


def test_an_out_path_that_is_not_a_zarr_name_or_in_a_missing_folder_is_refused(tmp_path):
    for out, message in ((tmp_path / "x.txt", "NAME.zarr"), (tmp_path / "nope" / "x.zarr", "does not exist")):
        result = runner.invoke(app, ["recipe", "visual_constraint", "--out", str(out)])
        assert result.exit_code == 2 and message in _text(result)


def test_a_grid_option_out_of_range_is_refused_before_any_work():
    result = runner.invoke(app, ["recipe", "visual_constraint", "--n-samples", "0"])
    assert result.exit_code == 2 and "--n-samples" in _text(result)


def test_a_recipe_on_an_organism_it_does_not_support_is_refused_before_loading(tmp_path):
    out = str(tmp_path / "x.zarr")
    result = runner.invoke(app, ["recipe", "blip_noise", "--model", "shapes-llava", "--out", out])
    assert result.exit_code == 2 and "runs on shapes-blip" in _text(result)


def test_zoo_eval_takes_n_samples_like_the_recipes_and_train_help_shows_its_default():
    assert "--n-samples" in runner.invoke(app, ["zoo", "eval", "--help"]).output
    assert "[default: (./NAME)]" in runner.invoke(app, ["zoo", "train", "--help"]).output


def test_the_public_api_names_each_resolve_to_an_object():
    import vlmtrace as vt

    for name in vt.__all__:
        assert getattr(vt, name) is not None


def test_a_screened_recipe_patches_only_the_screened_cells_and_records_how(tmp_path):
    """Files to store: `--screen 2 --screen-method ig` on 8 samples leaves at most 2 patched
    cells per sample, window and site (the rest NaN), and the store says how it screened."""
    import xarray as xr

    out = tmp_path / "screened.zarr"
    args = ["recipe", "visual_constraint", "--n-samples", "8", "--screen", "2", "--screen-method", "ig"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, _text(result)
    ds = xr.open_zarr(out)
    assert ds.attrs["screen"] == 2 and ds.attrs["screen_method"] == "ig"
    for site in ("mlp", "attn"):
        kept = ds[site].notnull().sum(["layer", "position"]).values
        assert kept.shape == (8, ds.sizes["window"]) and (kept >= 1).all() and (kept <= 2).all(), kept


def test_overwrite_never_writes_over_a_folder_that_is_not_a_store(tmp_path):
    mine = tmp_path / "mine.zarr"
    mine.mkdir()
    (mine / "thesis.tex").write_text("chapter 1")
    result = runner.invoke(app, ["recipe", "visual_constraint", "--out", str(mine), "--overwrite"])
    assert result.exit_code == 2 and "so vlmtrace leaves it as it is" in _text(result)
    assert (mine / "thesis.tex").read_text() == "chapter 1"


def test_overwrite_never_replaces_a_plain_file(tmp_path):
    file = tmp_path / "afile.zarr"
    file.write_text("mine")
    result = runner.invoke(app, ["recipe", "visual_constraint", "--out", str(file), "--overwrite"])
    assert result.exit_code == 2 and "is a file, not a store" in _text(result) and file.read_text() == "mine"


def test_a_device_torch_does_not_know_is_refused_before_loading(tmp_path):
    out = str(tmp_path / "x.zarr")
    result = runner.invoke(app, ["recipe", "visual_constraint", "--device", "bogus", "--out", out])
    assert result.exit_code == 2 and "device 'bogus' is not a device" in _text(result)


def test_remote_with_no_server_is_one_paragraph_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", "k")
    out = tmp_path / "x.zarr"
    args = ["recipe", "visual_constraint", "--remote", "--host", "http://127.0.0.1:9", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "no server answers at http://127.0.0.1:9" in _text(result)
    assert "Traceback" not in result.output and not out.with_suffix(".parts").exists()


def test_serve_refuses_a_port_out_of_range_and_an_unassignable_host_before_loading(tmp_path):
    key = str(tmp_path / "key")
    assert runner.invoke(app, ["serve", "no-such-model", "--port", "99999"]).exit_code == 2
    result = runner.invoke(app, ["serve", "no-such-model", "--host", "10.255.255.1", "--key-file", key])
    assert result.exit_code == 2 and "this machine has no such address" in _text(result)
    assert not os.path.exists(key)  # refused before the key file (and the model) was touched


def test_serve_refuses_a_body_limit_that_is_not_a_finite_size():
    result = runner.invoke(app, ["serve", "no-such-model", "--max-body", "1e400"])
    assert result.exit_code == 2 and "use a finite size" in _text(result)


def test_data_example_writes_a_layout_that_the_loaders_read_and_prints_the_data_path(tmp_path):
    from vlmtrace.data.loaders import load_dataset

    result = runner.invoke(app, ["data", "example", "gqa", str(tmp_path / "gqa")])
    assert result.exit_code == 0 and f"--data {tmp_path / 'gqa'}" in result.output
    assert len(load_dataset(tmp_path / "gqa")) == 10


def test_data_example_never_writes_into_a_folder_that_holds_files(tmp_path):
    (tmp_path / "vqa").mkdir()
    (tmp_path / "vqa" / "v2_mscoco_val2014_annotations.json").write_text("mine")
    result = runner.invoke(app, ["data", "example", "vqa", str(tmp_path / "vqa")])
    assert result.exit_code == 2 and "already holds files" in _text(result)
    assert (tmp_path / "vqa" / "v2_mscoco_val2014_annotations.json").read_text() == "mine"


def test_every_data_example_is_a_few_kilobytes(tmp_path):
    from vlmtrace.data.examples import EXAMPLES, write_example

    sizes = {}
    for layout in EXAMPLES:
        write_example(layout, tmp_path / layout)
        sizes[layout] = sum(f.stat().st_size for f in (tmp_path / layout).rglob("*") if f.is_file())
    assert all(size < 200_000 for size in sizes.values()), sizes


def test_a_vlmtrace_threads_that_is_not_a_number_is_one_paragraph_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMTRACE_THREADS", "abc")
    result = runner.invoke(app, ["recipe", "visual_constraint", "--out", str(tmp_path / "x.zarr")])
    text = _text(result)
    assert result.exit_code == 2 and "Traceback" not in text
    assert "VLMTRACE_THREADS='abc' is not a number of threads" in text and "--threads N" in text


def test_cuda_on_a_cpu_only_torch_says_the_build_is_cpu_only_and_how_to_get_a_gpu_one(tmp_path):
    import torch

    if torch.version.cuda is not None or torch.version.hip is not None:
        pytest.skip("this torch is built for a GPU")
    result = runner.invoke(
        app, ["recipe", "visual_constraint", "--device", "cuda", "--out", str(tmp_path / "x.zarr")]
    )
    text = _text(result)
    assert result.exit_code == 2 and "is a CPU-only build" in text and "Install a CUDA build of torch" in text


def test_an_out_path_under_a_file_names_the_file_in_the_way_not_a_missing_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "x.zarr"
    result = runner.invoke(app, ["recipe", "visual_constraint", "--out", str(out)])
    text = "".join(_text(result).split())  # rich may wrap the long path mid-word
    assert result.exit_code == 2 and "notes.txtisafile" in text and "doesnotexist" not in text


def test_a_file_where_the_figures_or_sub_sweeps_go_is_refused_before_the_run(tmp_path):
    for beside in ("x", "x.parts"):
        (tmp_path / beside).write_text("mine")
        result = runner.invoke(app, ["recipe", "visual_constraint", "--out", str(tmp_path / "x.zarr")])
        assert result.exit_code == 2 and "is a file, but the run writes its" in _text(result)
        (tmp_path / beside).unlink()


def test_a_data_run_shows_each_warning_once_in_one_line(tmp_path):
    """information_flow encodes each answer in its data check and again in each knockout sweep; every
    multi-token answer ('brown', 'gray', 'cyan' in the GQA example) used to be warned about each time."""
    from vlmtrace.data.examples import write_example

    data = write_example("gqa", tmp_path / "gqa")[0]
    command = [sys.executable, "-m", "vlmtrace.cli", "recipe", "information_flow", "--data", str(data)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, "--keep-wrong", "--out", str(tmp_path / "f.zarr")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,  # the installed vlmtrace (from the repository root, `vlmtrace/` has no recipes)
    )
    warned = [line for line in done.stderr.splitlines() if "AnswerTokenWarning" in line]
    assert done.returncode == 0, done.stderr[-2000:]
    answers = sorted(line.split("'")[1] for line in warned)
    assert answers == ["brown", "cyan", "gray"], warned
    assert all(line.startswith("Warning (AnswerTokenWarning): answer ") for line in warned)


def test_showing_each_warning_once_leaves_the_filters_in_charge():
    import warnings

    from vlmtrace.presentation.warning_lines import each_warning_once

    with warnings.catch_warnings(), each_warning_once():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="raised"):
            warnings.warn("raised", UserWarning, stacklevel=1)


def test_a_model_folder_that_does_not_exist_is_named_as_such_not_as_a_bad_repo_id(tmp_path):
    for command in (
        ["recipe", "visual_constraint", "--out", str(tmp_path / "x.zarr"), "--model"],
        ["check"],
        ["serve"],
    ):
        result = runner.invoke(app, [*command, "./no-such-model"])
        text = "".join(_text(result).split())
        assert result.exit_code == 2 and "isnotafolderhere" in text and "Traceback" not in text


def test_remote_with_a_host_that_is_not_a_url_is_one_paragraph(tmp_path, monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", "k")
    args = [
        "recipe",
        "visual_constraint",
        "--remote",
        "--host",
        "gpu-box:8000",
        "--out",
        str(tmp_path / "x.zarr"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "'gpu-box:8000' is not a URL" in _text(result)


def test_a_recipe_that_reads_no_data_refuses_data_naming_why(tmp_path):
    args = ["recipe", "multimodal_edit", "--data", str(tmp_path), "--out", str(tmp_path / "x.zarr")]
    result = runner.invoke(app, args)
    assert (
        result.exit_code == 2 and "reads no --data" in _text(result) and "load_edit_records" in _text(result)
    )


def test_concepts_on_a_folder_without_clevr_scenes_names_the_layout_it_needs(tmp_path):
    from vlmtrace.data.examples import write_example

    data = write_example("vqa", tmp_path / "vqa")[0]
    result = runner.invoke(
        app, ["recipe", "concepts", "--data", str(data), "--out", str(tmp_path / "x.zarr")]
    )
    assert result.exit_code == 2 and "scenes/CLEVR_val_scenes.json" in _text(result)


def test_zoo_train_into_a_file_is_refused_before_training(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["zoo", "train", "shapes-llava", "--out", str(tmp_path / "notes.txt")])
    assert result.exit_code == 2 and "is a file" in _text(result)
