"""A default run of every recipe, as a user starts it: no warning, a store any zarr reader opens,
every variable described, and one self-contained HTML report that a real browser renders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from PIL import Image

import vlmtrace.recipes as registry
from vlmtrace.presentation import plots
from vlmtrace.presentation.report import COLUMN

# Each recipe runs through the command line in one fresh process, with every warning a user
# would see (Python's default filters hide DeprecationWarnings raised inside libraries) turned
# into an error, and its store then opened with plain `xr.open_zarr`.
SCRIPT = """
import sys
import xarray as xr
from vlmtrace.cli import app

folder = sys.argv[1]
for name in sys.argv[2:]:
    store = f"{folder}/{name}.zarr"
    try:
        app(["recipe", name, "--n-samples", "2", "--out", store], standalone_mode=False)
    except SystemExit as stop:
        assert not stop.code, (name, stop.code)
    xr.open_zarr(store).load()
    print("ran", name, flush=True)
"""
WARNINGS_AS_ERRORS = ["-W", "error", "-W", "ignore::DeprecationWarning"]
WARNINGS_AS_ERRORS += ["-W", "ignore::PendingDeprecationWarning"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("recipes")
    done = subprocess.run(
        [sys.executable, *WARNINGS_AS_ERRORS, "-c", SCRIPT, str(folder), *registry.names()],
        capture_output=True,
        text=True,
        cwd=folder,
        timeout=900,
    )
    (folder / "log.txt").write_text(done.stdout + done.stderr)
    return folder


def test_a_default_run_of_every_recipe_and_opening_its_store_raise_no_warning(runs):
    log = (runs / "log.txt").read_text()
    assert [line.split()[1] for line in log.splitlines() if line.startswith("ran ")] == registry.names(), log


@pytest.mark.parametrize("name", registry.names())
def test_every_data_variable_of_a_recipe_store_has_a_description_and_units(runs, name):
    ds = xr.open_zarr(runs / f"{name}.zarr")
    for variable in ds.data_vars.values():
        assert variable.attrs.get("description") and variable.attrs.get("units"), variable.name


@pytest.mark.parametrize("name", ["multi_constraint", "gn_vs_str", "notice", "universal_heads", "blip_noise"])
def test_a_store_combined_from_several_sweeps_keeps_created_and_config_hash(runs, name):
    attrs = xr.open_zarr(runs / f"{name}.zarr").attrs
    assert attrs["created"].startswith("20") and len(attrs["config_hash"]) == 16
    assert all("config_hash" in part for part in json.loads(attrs["conditions"]).values())


def test_booleans_stay_booleans_in_a_store(runs):
    ds = xr.open_zarr(runs / "universal_heads.zarr")
    assert ds.attrs["whole_answer"] is False
    assert ds["universal"].dtype == bool and ds["top"].dtype == bool


def test_each_run_writes_one_report_that_embeds_every_figure_and_names_the_command(runs):
    for name in registry.names():
        page = (runs / f"{name}.html").read_text()
        figures = list((runs / name).glob("*.png"))
        assert figures and page.count("data:image/png;base64,") == len(figures)
        assert f"vlmtrace recipe {name} --n-samples 2 --out" in page
        assert 'src="http' not in page and 'href="http' not in page  # opens offline


def test_every_figure_of_every_run_records_what_it_drew_and_fits_the_report_column(runs):
    pngs = sorted(runs.glob("*/*.png"))
    assert {png.parent.name for png in pngs} == set(registry.names())
    for png in pngs:
        assert plots.scales(png)["panels"], png  # a figure drawn outside `plots` carries no record
        assert Image.open(png).size[0] <= COLUMN - 18, png  # wider ones are shrunk, text and all


def test_the_edit_traces_are_coloured_on_their_own_clean_corrupted_gap(runs):
    ds = xr.open_zarr(runs / "multimodal_edit.zarr").load()
    gap = float(np.nanmean(np.abs(np.concatenate([ds["trace_before_gap"], ds["trace_after_gap"]]))))
    maps = [ds[n].isel(window=0).mean("trace_sample") for n in ("trace_before", "trace_after")]
    largest = max(float(np.nanmax(np.abs(m.values))) for m in maps)
    limit = largest if largest > 1.02 * gap else gap  # plots.effect_range
    drawn = plots.scales(runs / "multimodal_edit" / "trace_before_after.png")
    assert [panel["clim"] for panel in drawn["panels"]] == [pytest.approx([-limit, limit])] * 2


def _browser() -> str | None:
    found = (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome"))
    return next((path for path in found if path), None)


@pytest.mark.skipif(_browser() is None, reason="no Chromium here (.ci/run installs it with apt-get)")
def test_a_report_renders_in_headless_chromium_with_every_figure_decoded(runs):
    page = runs / "notice.html"
    probe = runs / "probe.html"  # the report, plus a line that writes how many images decoded
    probe.write_text(
        page.read_text().replace(
            "</body>",
            "<script>window.onload = () => { const imgs = [...document.images]; document.title = "
            "'decoded ' + imgs.filter(i => i.complete && i.naturalWidth > 0).length + ' of ' + imgs.length; "
            "document.body.setAttribute('data-title', document.title); };</script></body>",
        )
    )
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [
                _browser(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=3000",
                "--dump-dom",
                probe.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HOME": profile},
        )
    images = len(list((runs / "notice").glob("*.png")))
    assert f"<title>decoded {images} of {images}</title>" in done.stdout, done.stderr[-2000:]


# --- issue 20: a complete store's finishing stage is resumed by the same command -------------


@pytest.fixture
def finished_store(runs, tmp_path) -> Path:
    """What a kill (or a full disk) in the figures stage leaves: a complete store, a half-written
    figure and no report."""
    out = tmp_path / "visual_constraint.zarr"
    shutil.copytree(runs / "visual_constraint.zarr", out)
    (tmp_path / "visual_constraint").mkdir()
    (tmp_path / "visual_constraint" / "mlp_windows.png").write_bytes(b"\x89PNG\r\n")
    return out


def rerun(out: Path, *extra: str):
    from typer.testing import CliRunner

    from vlmtrace.cli import app

    args = ["recipe", "visual_constraint", "--n-samples", "2", "--out", str(out), *extra]
    return CliRunner().invoke(app, args)


def test_rerunning_the_command_of_a_complete_store_draws_its_figures_and_report_without_the_model(
    finished_store, runs, monkeypatch
):
    import vlmtrace.models.load

    def no_model(*args, **kwargs):
        raise AssertionError("the finishing stage loaded the model")

    monkeypatch.setattr(vlmtrace.models.load, "load", no_model)
    result = rerun(finished_store)
    assert result.exit_code == 0, result.output
    drawn = sorted(p.name for p in finished_store.with_suffix("").glob("*.png"))
    assert drawn == sorted(p.name for p in (runs / "visual_constraint").glob("*.png"))
    assert finished_store.with_suffix(".html").read_text().count("data:image/png;base64,") == len(drawn)


def test_another_command_on_a_complete_store_is_refused_naming_the_command_that_wrote_it(finished_store):
    result = rerun(finished_store, "--seed", "3")
    words = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "exists, written by" in words and "--overwrite" in words


def test_a_full_disk_in_the_finishing_stage_keeps_the_store_and_says_to_rerun(finished_store, monkeypatch):
    import errno

    def disk_full(ds, folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(registry.get("visual_constraint"), "figures", disk_full)
    result = rerun(finished_store)
    words = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "is complete, but its figures and report could not be written" in words
    assert "rerun the same command" in words and xr.open_zarr(finished_store)["mlp"].size > 0
