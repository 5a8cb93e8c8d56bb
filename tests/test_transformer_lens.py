"""vlmtrace's activation patching agrees with TransformerLens 4.3, cell by cell, on tiny text LMs.

TransformerLens is an independent implementation of the same experiment: its `TransformerBridge`
hooks the Hugging Face model through its own hook points, and
`transformer_lens.patching.generic_activation_patch` runs one forward per (layer, position[, head])
cell, patching a cached activation of the other run into the whole batch. vlmtrace instead batches
every cell as a row of one nnsight trace. The two must give the same metric in every cell.

The sites are named differently by the two libraries:

    vlmtrace     TransformerLens            what it is
    block        blocks.{l}.hook_resid_post the residual stream after layer l
    attn         blocks.{l}.hook_attn_out   the attention module's output
    mlp          blocks.{l}.hook_mlp_out    the MLP's output
    attn_head    blocks.{l}.attn.hook_z     one head's slice of the input of the output projection

vlmtrace's "denoise" runs the corrupted prompt and restores clean activations, which is
TransformerLens patching the corrupted tokens with the clean cache; "noise" is the reverse.
Models are random but with a large initialisation, so effects are of order one and a wrong
layer, position or head would show (see `test_patching_effects_vary_across_cells`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import vlmtrace as vt
from vlmtrace.models.build import word_tokenizer

patching = pytest.importorskip("transformer_lens.patching")
TransformerBridge = pytest.importorskip("transformer_lens.model_bridge").TransformerBridge

WORDS = "the cat dog sat on mat in city of paris rome".split()
PROMPT = "the cat sat on the mat in the city of"
SUBJECT, REPLACEMENT = "cat", "dog"
ANSWER, FOIL = "paris", "rome"

# vlmtrace site -> (TransformerLens activation name, patch setter, axes TransformerLens iterates)
TL_SITES = {
    "block": ("resid_post", patching.layer_pos_patch_setter, ("layer", "pos")),
    "attn": ("attn_out", patching.layer_pos_patch_setter, ("layer", "pos")),
    "mlp": ("mlp_out", patching.layer_pos_patch_setter, ("layer", "pos")),
    "attn_head": ("z", patching.layer_pos_head_vector_patch_setter, ("layer", "pos", "head")),
}
DIRECTIONS = ("denoise", "noise")
TOLERANCE = 2e-5
"""Absolute, on logit differences of order one. Measured: Llama agrees exactly, GPT-2 to 3e-6
(float32 rows of one batched matmul vs one-row matmuls); a cell off by one layer, position
or head is off by more than 0.3."""


def tiny_config(architecture: str, tokenizer) -> transformers.PretrainedConfig:
    """3 layers, width 32, 4 heads; initializer_range 0.3 so that patches move the logits."""
    special = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "initializer_range": 0.3,
    }
    if architecture == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, **special)
    return transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        **special,
    )


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_dir(request, tmp_path_factory):
    """A seeded random-weight causal LM and its word tokenizer, saved as a Hugging Face directory."""
    tokenizer = word_tokenizer(WORDS)
    config = tiny_config(request.param, tokenizer)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vlm(model_dir) -> vt.VLM:
    return vt.load(str(model_dir))


@pytest.fixture(scope="module")
def bridge(model_dir):
    """TransformerLens's view of the same saved weights (its own copy of the HF model)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    bridge = TransformerBridge.boot_transformers(str(model_dir), hf_model=model.eval(), device="cpu")
    return bridge.eval()


@pytest.fixture(scope="module")
def traces(vlm):
    """vlmtrace's result for every site, per direction: one `vt.patch` call each."""
    sample = vt.Sample(prompt=PROMPT, answer=ANSWER, foil=FOIL, spans={"subject": SUBJECT}, id="q")
    return {
        direction: vt.patch(
            vlm,
            [sample],
            corruption=vt.SymmetricTokenReplacement("subject", text=REPLACEMENT),
            grid=vt.Grid(sites=tuple(TL_SITES), positions="tokens"),
            metric=vt.LogitDiff(),
            direction=direction,
            progress=False,
        )
        for direction in DIRECTIONS
    }


def token_ids(vlm: vt.VLM, prompt: str) -> torch.Tensor:
    return vlm.tokenizer(prompt, return_tensors="pt").input_ids


def logit_diff(vlm: vt.VLM):
    answer, foil = vlm.tokenizer.convert_tokens_to_ids([ANSWER, FOIL])
    return lambda logits: logits[0, -1, answer] - logits[0, -1, foil]


def transformer_lens_grid(vlm: vt.VLM, bridge, site: str, direction: str) -> np.ndarray:
    """TransformerLens's grid for one site: [layer, pos] or [layer, pos, head]."""
    clean, corrupt = token_ids(vlm, PROMPT), token_ids(vlm, PROMPT.replace(SUBJECT, REPLACEMENT, 1))
    run, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    name, setter, axes = TL_SITES[site]
    with torch.no_grad():
        _, cache = bridge.run_with_cache(source)
        values = patching.generic_activation_patch(
            bridge, run, cache, logit_diff(vlm), setter, name, index_axis_names=axes
        )
    return values.numpy()


@pytest.fixture(scope="module")
def oracle(vlm, bridge):
    """TransformerLens's grid for every (site, direction): one forward per cell."""
    return {
        (site, direction): transformer_lens_grid(vlm, bridge, site, direction)
        for site in TL_SITES
        for direction in DIRECTIONS
    }


def vlmtrace_grid(ds, site: str) -> np.ndarray:
    """vlmtrace's values for one site in TransformerLens's axis order."""
    values = ds[site].sel(sample="q", window=1)
    order = ("layer", "position", "head") if "head" in values.dims else ("layer", "position")
    return values.transpose(*order).values


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_clean_and_corrupted_runs_score_as_in_transformer_lens(vlm, bridge, traces, direction):
    metric = logit_diff(vlm)
    with torch.no_grad():
        expected = [
            metric(bridge(token_ids(vlm, prompt))).item()
            for prompt in (PROMPT, PROMPT.replace(SUBJECT, REPLACEMENT, 1))
        ]
    ds = traces[direction].sel(sample="q")
    np.testing.assert_allclose([ds["clean"].item(), ds["corrupt"].item()], expected, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("site", list(TL_SITES))
def test_every_cell_equals_transformer_lens_patching(traces, oracle, site, direction):
    expected = oracle[site, direction]
    np.testing.assert_allclose(vlmtrace_grid(traces[direction], site), expected, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("site", list(TL_SITES))
def test_patching_effects_vary_across_cells(oracle, site, direction):
    """Guard for the comparison above: a flat grid could not tell a wrong cell from a right one."""
    assert np.ptp(oracle[site, direction]) > 0.1
