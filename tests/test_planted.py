"""Specification of the planted organisms: the mechanism each one declares is the one it has.

Interchanges here are computed with plain torch hooks written in this file, on inputs made by
the organism's own HF processor, so they share no code with the training and evaluation
machinery they check (`vlmtrace.models.zoo.swaps`, `siit`, `interchange`).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration
from typer.testing import CliRunner

import vlmtrace as vt
from vlmtrace.cli.zoo import app
from vlmtrace.data.drawing import to_image
from vlmtrace.data.mascots import mascot_city
from vlmtrace.data.planted import ask_planted, make_planted_samples
from vlmtrace.models.processor import load_processor
from vlmtrace.models.zoo import PLANTED, fit_planted, organism_dir, train_planted
from vlmtrace.models.zoo.answering import accuracy
from vlmtrace.models.zoo.interchange import TARGETS, Scorer, held_out_pairs
from vlmtrace.models.zoo.mechanism import Component, Mechanism

NAMES = list(PLANTED)
CLASSES = {c.__name__: c for c in (LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration)}
PAIRS = 12  # held-out (base, source) pairs per check


@pytest.fixture(scope="module", params=NAMES)
def planted(request):
    path = organism_dir(request.param)
    architecture = json.loads((path / "config.json").read_text())["architectures"][0]
    model = CLASSES[architecture].from_pretrained(path, attn_implementation="eager").eval()
    mechanism = json.loads((path / "mechanism.json").read_text())
    return request.param, model, load_processor(path), mechanism


def _encode(processor, questions):
    return processor(
        text=[f"<image> {q.text}" for q in questions],
        images=[to_image(q.scene) for q in questions],
        return_tensors="pt",
        padding=True,
    )


def _position(processor, inputs, question, where: str) -> int:
    """The constraint's last token (the kind word) or the last position, found in the ids."""
    if where == "last":
        return inputs["input_ids"].shape[1] - 1
    kind = processor.tokenizer.convert_tokens_to_ids(question.meta["kind"])
    return int((inputs["input_ids"][0] == kind).nonzero()[-1])


def _swapped_top1(model, processor, bases, sources, site, layer, head, where) -> list[str]:
    """Top-1 answer of each base with (site, layer, head) at `where` taken from its source."""
    layers = model.model.language_model.layers
    n_heads = model.config.get_text_config().num_attention_heads
    module = layers[layer].self_attn.o_proj if site == "attn_head" else layers[layer].mlp
    base_inputs, source_inputs = _encode(processor, bases), _encode(processor, sources)
    position = _position(processor, base_inputs, bases[0], where)
    assert position == _position(processor, source_inputs, sources[0], where)
    saved = {}

    def keep(mod, args, output=None):
        saved["value"] = (args[0] if site == "attn_head" else output).detach().clone()

    def put(mod, args, output=None):
        if site == "attn_head":
            x = args[0].clone()
            rows, width, dim = x.shape
            view, source = x.view(rows, width, n_heads, -1), saved["value"].view(rows, width, n_heads, -1)
            view[:, position, head] = source[:, position, head]
            return (x, *args[1:])
        out = output.clone()
        out[:, position] = saved["value"][:, position]
        return out

    register = module.register_forward_pre_hook if site == "attn_head" else module.register_forward_hook
    with torch.no_grad():
        handle = register(keep)
        model(**source_inputs)
        handle.remove()
        handle = register(put)
        logits = model(**base_inputs).logits[:, -1]
        handle.remove()
    return processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())


def _pairs(n, seed=1):
    rng = random.Random(f"test-planted/{seed}")
    return [(ask_planted(rng, split="test"), ask_planted(rng, split="test")) for _ in range(n)]


def test_each_planted_organism_loads_with_plain_transformers_and_vlmtrace(planted):
    name, model, _, mechanism = planted
    assert set(mechanism["assignment"]) == {"colour", "city", "answer"}
    assert vt.load(name).adapter.family in ("llava", "qwen2_vl")
    assert (organism_dir(name) / "README.md").read_text().startswith("---")


def test_planted_weights_are_small():
    for name in NAMES:
        assert (organism_dir(name) / "model.safetensors").stat().st_size < 3 * 2**20


def test_planted_organisms_answer_held_out_questions(planted):
    _, model, processor, _ = planted
    assert accuracy(model, processor, make_planted_samples(40, seed=3)) >= 0.95


@pytest.mark.parametrize("variable", ["colour", "city", "answer"])
def test_interchanging_a_planted_component_gives_the_high_level_prediction(planted, variable):
    _, model, processor, mechanism = planted
    a = mechanism["assignment"][variable]
    pairs = [
        (b, s)
        for b, s in _pairs(4 * PAIRS)
        if b.scene[b.meta["selected"]].colour != s.scene[s.meta["selected"]].colour
    ]
    pairs = pairs[:PAIRS]
    bases, sources = [b for b, _ in pairs], [s for _, s in pairs]
    got = _swapped_top1(model, processor, bases, sources, a["site"], a["layer"], a.get("head"), a["position"])
    colour = [s.scene[s.meta["selected"]].colour for s in sources]
    if variable == "colour":  # the source's colour with the base's kind
        expected = [mascot_city((c, b.meta["kind"])) for c, b in zip(colour, bases, strict=True)]
    else:  # the source's city
        expected = [s.answer for s in sources]
    assert all(e != b.answer for e, b in zip(expected, bases, strict=True))  # every pair is a real test
    assert sum(g == e for g, e in zip(got, expected, strict=True)) >= PAIRS - 1, (got, expected)


def test_swapping_unassigned_components_leaves_the_answer(planted):
    _, model, processor, mechanism = planted
    colour, city, answer = (mechanism["assignment"][v] for v in ("colour", "city", "answer"))
    other_head = (colour["head"] + 1) % model.config.get_text_config().num_attention_heads
    unassigned = [
        ("attn_head", colour["layer"], other_head, "constraint"),  # the colour head's neighbour
        ("mlp", city["layer"] - 1, None, "constraint"),  # the MLP below the city MLP
        ("mlp", city["layer"], None, "last"),  # the city MLP where it is not assigned
        ("attn_head", answer["layer"], answer["head"], "constraint"),  # the answer head elsewhere
    ]
    pairs = _pairs(PAIRS, seed=2)
    bases, sources = [b for b, _ in pairs], [s for _, s in pairs]
    for site, layer, head, where in unassigned:
        got = _swapped_top1(model, processor, bases, sources, site, layer, head, where)
        changed = sum(g != b.answer for g, b in zip(got, bases, strict=True))
        assert changed <= 1, (site, layer, head, where, got)


def test_the_evaluation_swaps_agree_with_plain_hooks(planted):
    name, model, processor, mechanism = planted
    pairs = held_out_pairs(8)
    scorer = Scorer(model, processor.tokenizer, pairs)
    a = mechanism["assignment"]["colour"]
    ids = scorer.top1([(Component("attn_head", a["layer"], a["head"]), [scorer.named["constraint"]])])
    expected = _swapped_top1(
        model,
        processor,
        [b for b, _ in pairs],
        [s for _, s in pairs],
        "attn_head",
        a["layer"],
        a["head"],
        "constraint",
    )
    assert processor.tokenizer.convert_ids_to_tokens(ids.tolist()) == expected


def test_card_states_the_measured_figures_and_whether_strictness_meets_its_target(planted):
    name = planted[0]
    figures = json.loads((organism_dir(name) / "organism.json").read_text())["figures"]
    assert figures["task"] >= TARGETS["task"]
    assert min(figures["interchange"].values()) >= TARGETS["interchange"]
    card = (organism_dir(name) / "README.md").read_text()
    assert f"task accuracy (top-1 over the whole vocabulary): {figures['task']:.3f}" in card
    worst = max(figures["strictness"].values())
    assert f"changes the answer on at most {worst:.3f} of pairs" in card
    assert ("target <= 0.02: met" in card) == (worst <= TARGETS["strictness"])


def test_mechanism_json_round_trips():
    for name in NAMES:
        mechanism = Mechanism.from_json(organism_dir(name) / "mechanism.json")
        assert mechanism == PLANTED[name].mechanism


def test_high_level_model_interchanges_the_colour_with_the_base_kind():
    mechanism = PLANTED["planted-llava"].mechanism
    base, source = _pairs(1, seed=5)[0]
    source_colour = source.scene[source.meta["selected"]].colour
    assert mechanism.interchange(base, source, "colour") == mascot_city((source_colour, base.meta["kind"]))
    assert mechanism.interchange(base, source, "city") == source.answer


def test_a_mechanism_must_go_up_the_layers():
    good = PLANTED["planted-llava"].mechanism
    swapped = dict(good.assignment)
    swapped["colour"], swapped["answer"] = good.assignment["answer"], good.assignment["colour"]
    with pytest.raises(ValueError, match="increasing layers"):
        Mechanism(swapped)


@pytest.mark.slow  # trains (twice); the tests above only load the shipped organisms
def test_three_siit_steps_twice_give_identical_weights():
    first, _, _ = fit_planted("planted-llava", steps=3)
    second, _, _ = fit_planted("planted-llava", steps=3)
    a, b = first.state_dict(), second.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_eval_of_a_planted_organism_ends_with_the_machine_readable_line():
    result = CliRunner().invoke(app, ["eval", "planted-llava", "--n", "2"])
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 0, result.output
    assert "strictness per position: worst cell L" in result.output
    assert [part.split("=")[0] for part in last.split()[2:]] == ["task", "interchange_min", "strictness_max"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_retraining_reproduces_the_shipped_planted_weights_bit_for_bit(name, tmp_path):
    train_planted(name, tmp_path, pairs=8, log_every=0)
    shipped = load_file(organism_dir(name) / "model.safetensors")
    retrained = load_file(tmp_path / "model.safetensors")
    assert shipped.keys() == retrained.keys()
    assert all(torch.equal(shipped[k], retrained[k]) for k in shipped)
