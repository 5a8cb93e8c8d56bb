"""The shipped table of image-text-to-text classes (`python tests/model_classes.py`) says what loading
each class does: supported classes have an adapter, refused ones stop with their reason, untested
ones stop naming the adapter fields to write; and it lists every class this transformers ships."""

from __future__ import annotations

import json
from importlib import resources

import pytest
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from vlmtrace.models.adapter import UnknownArchitectureError
from vlmtrace.models.refusals import RefusedArchitectureError
from vlmtrace.models.registry import ADAPTERS, adapter_for

SHIPPED = json.loads(resources.files("vlmtrace.models").joinpath("classes.json").read_text())["classes"]
REGENERATE = "regenerate with `python tests/model_classes.py` (after `python tests/support_matrix.py`)"


def test_the_table_lists_every_class_this_transformers_maps():
    missing = set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values()) - set(SHIPPED)
    assert not missing, f"{sorted(missing)} are not in the table: {REGENERATE}"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_each_class_loads_or_stops_as_the_table_says(name):
    row = SHIPPED[name]
    if "adapters" in row:
        assert [a.family for a in ADAPTERS.get(name, [])] == [a["family"] for a in row["adapters"]], (
            REGENERATE
        )
        return
    with pytest.raises(UnknownArchitectureError) as stopped:
        adapter_for(name)
    refused = isinstance(stopped.value, RefusedArchitectureError)
    assert refused == (row["status"] == "refused"), REGENERATE
    if refused:
        assert row["reason"] in str(stopped.value)
