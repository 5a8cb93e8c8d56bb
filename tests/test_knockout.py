"""Attention knockout blocks exactly the chosen edges and nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vlmtrace as vt
from vlmtrace.engine.corruptions import clean_side
from vlmtrace.engine.forward import Edits, run, stack_rows
from vlmtrace.engine.inputs import scored_answer_ids
from vlmtrace.engine.knockout import EmptyBlockError


def attention_probabilities_under_knockout(vlm, sample, knocked_layers, queries, keys):
    """Run clean row 0 and a knocked-out row 1; capture every layer's attention probabilities
    with plain forward hooks on the HF modules."""
    stack = vlm.adapter.stacks["lm"]
    answer = scored_answer_ids(vlm, sample.prompt, sample.answer, whole=False)
    encoded = clean_side(vlm, sample, answer)
    edits = Edits()
    for layer in knocked_layers:
        index = edits.knock(layer)
        for q in queries:
            for k in keys:
                index.row.append(1)
                index.query.append(q)
                index.key.append(k)
    batch = stack_rows(vlm, [encoded.inputs] * 2, {"prompt": len(encoded.inputs["input_ids"])})
    captured = {}
    handles = [
        layer.self_attn.register_forward_hook(
            lambda mod, args, out, i=i: captured.__setitem__(i, out[1].detach().clone())
        )
        for i, layer in enumerate(vlm.model.model.language_model.layers)
    ]
    try:
        run(
            vlm,
            stack,
            batch,
            edits,
            metric=vt.Probability(),
            answer=torch.tensor(answer),
            foil=None,
            answer_slice=slice(-1, None),
        )
    finally:
        for handle in handles:
            handle.remove()
    return captured, encoded.prompt


def test_knocked_out_edges_have_exactly_zero_attention(tiny_llava, llava_sample):
    segments = clean_side(tiny_llava, llava_sample, (0,)).prompt
    queries, keys = segments.positions("last"), segments.positions("image")
    probs, _ = attention_probabilities_under_knockout(tiny_llava, llava_sample, [1, 2], queries, keys)
    for layer in (1, 2):
        blocked = probs[layer][1][:, queries][:, :, keys]
        assert torch.count_nonzero(blocked) == 0


def test_attention_below_the_first_knocked_layer_is_unchanged(tiny_llava, llava_sample):
    segments = clean_side(tiny_llava, llava_sample, (0,)).prompt
    queries, keys = segments.positions("question"), segments.positions("image")
    probs, _ = attention_probabilities_under_knockout(tiny_llava, llava_sample, [1, 2], queries, keys)
    assert torch.equal(probs[0][1], probs[0][0])
    others = [q for q in range(probs[1].shape[-2]) if q not in queries]
    assert torch.equal(probs[1][1][:, others], probs[1][0][:, others])
    assert not torch.equal(probs[1][1][:, queries], probs[1][0][:, queries])


def test_knockout_of_image_to_last_at_every_layer_changes_the_answer_probability(tiny_llava, llava_sample):
    ds = vt.knockout(
        tiny_llava, [llava_sample], blocks={"image->last": ("image", "last")}, windows=(3,), progress=False
    )
    clean = float(ds["clean"].squeeze())
    assert abs(float(ds["knockout"].sel(block="image->last", layer=1).squeeze()) - clean) > 1e-4


def test_a_block_that_blocks_nothing_is_an_error_not_a_silent_zero(tiny_llava, llava_sample):
    with pytest.raises(EmptyBlockError, match="blocks nothing for sample 'q0': its key side"):
        vt.knockout(tiny_llava, [llava_sample], blocks={"nothing": ((), "last")}, progress=False)


def test_knockout_results_carry_named_dims_and_provenance(tiny_llava, llava_sample):
    ds = vt.knockout(tiny_llava, [llava_sample], windows=(1, 2), progress=False)
    assert ds["knockout"].dims == ("sample", "block", "window", "layer")
    assert ds.attrs["experiment"] == "knockout" and ds.attrs["model"] == "tiny-llava"


def test_knockout_stores_per_sample_the_positions_each_block_cut(tiny_llava, llava_sample):
    blocks = {"image->last": ("image", "last"), "visual->question": ("visual", "question")}
    ds = vt.knockout(tiny_llava, [llava_sample], blocks=blocks, layers=(0,), progress=False)
    ids = tiny_llava.processor(text=[llava_sample.prompt], images=[llava_sample.image])["input_ids"][0]
    image = [i for i, t in enumerate(ids) if t == tiny_llava.tokenizer.convert_tokens_to_ids("<image>")]
    this, year = (ids.index(tiny_llava.tokenizer.convert_tokens_to_ids(w)) for w in ("this", "year"))
    spans = (this, this + 1, year, year + 1)  # "this shape" (visual), "year 2006" (textual)
    question = [p for p in range(image[-1] + 1, len(ids) - 1) if p not in spans]  # bos comes first
    keys = ds["key_blocked"].sel(sample="q0")
    queries = ds["query_blocked"].sel(sample="q0")
    assert list(np.flatnonzero(keys.sel(block="image->last"))) == image
    assert list(np.flatnonzero(queries.sel(block="image->last"))) == [len(ids) - 1]
    assert list(np.flatnonzero(keys.sel(block="visual->question"))) == [this, this + 1]
    assert list(np.flatnonzero(queries.sel(block="visual->question"))) == question
    assert ds["key_label"].sel(sample="q0").values[image[0]] == "image"
