"""A figure's title names the constraint and the corruption it shows, read from the result's attrs."""

from __future__ import annotations

import json

import xarray as xr

import vlmtrace as vt
from vlmtrace.presentation.titles import describe_run
from vlmtrace.results.dataset import combine


def sweep(corruption: vt.Corruption, direction: str = "denoise") -> xr.Dataset:
    """A one-sample result with the attrs a sweep writes."""
    attrs = {
        "model": "by-hand",
        "corruption": json.dumps(corruption.describe()),
        "metric": "probability",
        "direction": direction,
    }
    return xr.Dataset({"clean": ("sample", [0.9]), "corrupt": ("sample", [0.1])}, attrs=attrs)


def test_each_constraint_of_a_combined_result_is_titled_with_its_own_corruption():
    both = combine({c: sweep(vt.ReplaceSpan(c)) for c in ("visual", "textual")}, dim="constraint")
    assert "corruption" not in both.attrs  # the two disagree, so only `conditions` has them
    visual, textual = (describe_run(both.sel(constraint=c)) for c in ("visual", "textual"))
    assert "visual constraint replaced" in visual and "textual" not in visual
    assert "textual constraint replaced" in textual and "visual" not in textual


def test_titles_tell_str_sip_and_noise_apart_and_say_what_each_corrupts():
    parts = {
        "str": sweep(vt.SymmetricTokenReplacement("visual")),
        "sip": sweep(vt.ImagePair()),
        "gn": sweep(vt.GaussianNoise("image", scale=3.0, samples=10)),
    }
    ds = combine(parts, dim="corruption")
    words = {name: describe_run(ds.sel(corruption=name)) for name in parts}
    assert "STR: visual constraint" in words["str"] and "(text corruption)" in words["str"]
    assert "SIP" in words["sip"] and "(image corruption)" in words["sip"]
    assert ["SIP" in w for w in words.values()] == [False, True, False]  # each names its own alone
    assert "Gaussian noise 3.0 sd on the image embeddings, 10 draws (image corruption)" in words["gn"]


def test_the_title_says_which_way_states_were_patched():
    assert "clean states restored into the corrupted run" in describe_run(sweep(vt.ImagePair()))
    assert "corrupted states patched into the clean run" in describe_run(sweep(vt.ImagePair(), "noise"))
