"""Specification of the shipped model organisms (vlmtrace.models.zoo) and `vlmtrace zoo`."""

from __future__ import annotations

import json
import random
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import vlmtrace as vt
from vlmtrace.cli.zoo import app
from vlmtrace.data import synthetic_samples
from vlmtrace.data.scenes import ask, for_blip, make_samples
from vlmtrace.models.processor import load_processor
from vlmtrace.models.zoo import (
    ORGANISMS,
    PLANTED,
    evaluate,
    fit,
    held_out_accuracy,
    load_organism,
    organism_dir,
    parameter_count,
    train,
)
from vlmtrace.models.zoo.answering import answer_probability, architecture_of
from vlmtrace.models.zoo.batches import Encoder
from vlmtrace.models.zoo.evaluation import TARGETS
from vlmtrace.models.zoo.training import build, spec_for
from vlmtrace.results.stats import spread

NAMES = list(ORGANISMS)  # every spec in the catalogue
SHIPPED = [n for n in NAMES if (organism_dir(n) / "config.json").exists()]  # with weights
N = 300  # held-out questions per family


@pytest.fixture(scope="module", params=SHIPPED)
def organism(request):
    model, processor = load_organism(request.param)
    return request.param, model, processor


def _replace_phrase(sample):
    phrase, replacement = sample.spans["visual"], sample.replacements["visual"]
    return sample.with_(prompt=sample.prompt.replace(phrase, replacement, 1))


def _pair(sample):
    return sample.with_(image=sample.image_pair)


def _samples(families, n, *, need):
    out = [s for f in families for s in make_samples(f, n, seed=1, split="test")]
    return [s for s in out if need(s)]


def test_every_shipped_organism_directory_has_weights_tokenizer_and_processor():
    for name in SHIPPED:
        files = {p.name for p in organism_dir(name).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "organism.json"} <= files
        assert "processor_config.json" in files or "preprocessor_config.json" in files


def test_shipped_organisms_fit_in_20_megabytes():
    size = sum(p.stat().st_size for name in SHIPPED for p in organism_dir(name).iterdir())
    assert size <= 20 * 2**20


def test_unknown_organism_name_error_lists_the_shipped_names():
    with pytest.raises(ValueError, match="shapes-llava"):
        organism_dir("shapes-gpt")


@pytest.mark.parametrize("name", SHIPPED)
def test_loaded_processor_encodes_exactly_like_a_freshly_built_one(name):
    _, fresh = build(spec_for(name))
    loaded = load_processor(organism_dir(name))  # shapes-qwen's: image-only (no torchvision)
    samples = make_samples("multi", 4, seed=0) + make_samples("visual", 4, seed=0)
    if ORGANISMS[name].architecture == "blip":
        samples = [for_blip(s) for s in samples]
    text, images = [s.prompt for s in samples], [s.image for s in samples]
    a = fresh(text=text, images=images, return_tensors="pt", padding=True)
    b = loaded(text=text, images=images, return_tensors="pt", padding=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", NAMES)
def test_training_batches_equal_the_processor_encoding(name):
    _, processor = build(spec_for(name))
    architecture = ORGANISMS[name].architecture
    rng = random.Random(0)
    questions = [ask(rng, t, split="test") for t in ("kind", "multi", "count", "named-fact")]
    batch = Encoder(processor.tokenizer, architecture=architecture)(questions)
    samples = [q.to_sample(str(i)) for i, q in enumerate(questions)]
    if architecture == "blip":
        samples = [for_blip(s) for s in samples]
    inputs = processor(
        text=[s.prompt for s in samples],
        images=[s.image for s in samples],
        return_tensors="pt",
        padding=True,
    )
    exact = ["input_ids", "attention_mask"]
    if architecture == "qwen":  # M-RoPE's inputs: token types and image grids, never position_ids
        exact += ["mm_token_type_ids", "image_grid_thw"]
    assert all(torch.equal(inputs[k], batch.inputs[k]) for k in exact)
    torch.testing.assert_close(inputs["pixel_values"], batch.inputs["pixel_values"])


def test_shipped_weights_reach_the_held_out_accuracy_targets(organism):
    _, model, processor = organism
    accuracies = held_out_accuracy(model, processor, n=N)
    assert all(accuracies[f] >= t for f, t in TARGETS.items()), accuracies


def test_organism_json_records_seed_steps_time_and_accuracies():
    for name in SHIPPED:
        record = json.loads((organism_dir(name) / "organism.json").read_text())
        assert record["seed"] == ORGANISMS[name].seed and record["steps"] == ORGANISMS[name].steps
        assert record["train_seconds"] > 0 and set(TARGETS) <= set(record["held_out_accuracy"])


def test_swapping_in_the_image_pair_drops_p_answer_by_half(organism):
    _, model, processor = organism
    samples = _samples(["visual", "fact", "multi"], 40, need=lambda s: s.image_pair is not None)
    clean = answer_probability(model, processor, samples)
    corrupted = answer_probability(model, processor, [_pair(s) for s in samples])
    assert (clean - corrupted).mean() >= 0.5


def test_replacing_the_visual_phrase_drops_p_answer_by_half(organism):
    _, model, processor = organism
    samples = _samples(["visual", "fact", "multi", "named"], 30, need=lambda s: "visual" in s.replacements)
    clean = answer_probability(model, processor, samples)
    corrupted = answer_probability(model, processor, [_replace_phrase(s) for s in samples])
    assert (clean - corrupted).mean() >= 0.5


@contextmanager
def _restoring(module: torch.nn.Module, clean_outputs: list):
    """Replace `module`'s outputs, call by call, by a clean run's outputs (every position).

    BLIP organisms score one forward per prompt length, so a run is several calls.
    """
    replay = iter(clean_outputs)

    def hook(_module, _inputs, output):
        clean_output = next(replay)
        if isinstance(output, tuple):
            return (clean_output[0], *output[1:])
        if hasattr(output, "last_hidden_state"):
            output.last_hidden_state = clean_output.last_hidden_state
            return output
        return clean_output

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _entry(model, stream: str) -> torch.nn.Module:
    """Where the corrupted input enters: the image encoder or the first text layer."""
    if architecture_of(model) in ("llava", "qwen"):
        language = model.model.language_model
        image = (
            model.model.multi_modal_projector
            if architecture_of(model) == "llava"
            else model.model.visual.merger
        )
        return image if stream == "image" else language.layers[0]
    return model.vision_model if stream == "image" else model.text_encoder.encoder.layer[0]


def _captured(module, run):
    seen = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("stream", ["image", "text"])
def test_restoring_the_corrupted_stream_everywhere_recovers_the_clean_probability(organism, stream):
    _, model, processor = organism
    corrupt = _pair if stream == "image" else _replace_phrase
    samples = _samples(["fact", "multi"], 8, need=lambda s: True)
    clean = answer_probability(model, processor, samples)
    module = _entry(model, stream)
    clean_outputs = _captured(module, lambda: answer_probability(model, processor, samples))
    with _restoring(module, clean_outputs):
        restored = answer_probability(model, processor, [corrupt(s) for s in samples])
    torch.testing.assert_close(restored, clean, atol=1e-5, rtol=0)


@pytest.mark.parametrize("corruption", [vt.ImagePair(), vt.ReplaceSpan("textual")], ids=["sip", "textual"])
def test_multi_constraint_traces_spread_over_layers_and_tokens_not_only_the_last(corruption):
    llava = vt.load("shapes-llava")
    samples = synthetic_samples(llava, "multi", 8, seed=0)
    grid = vt.Grid(sites=("block",), windows=(1,), skip=("image",))
    ds = vt.patch(llava, samples, corruption=corruption, grid=grid, metric=vt.Probability(), progress=False)
    where = spread(ds, "block", threshold=0.05)
    assert not where.degenerate, where


@pytest.mark.parametrize("name", NAMES)
def test_twenty_training_steps_twice_give_identical_weights(name):
    first, _ = fit(name, steps=20)
    second, _ = fit(name, steps=20)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_another_seed_gives_other_weights():
    a, _ = fit("shapes-blip", steps=2)
    b, _ = fit("shapes-blip", steps=2, seed=1)
    patches = [m.vision_model.embeddings.patch_embedding.weight for m in (a, b)]
    assert not torch.equal(*patches)


TRAINED_ELSEWHERE = pytest.mark.xfail(
    reason="retraining shapes-blip here reproduces itself, not the shipped weights (likely trained "
    "on another CPU; README, 'Retraining reproduces itself')",
    strict=False,
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=TRAINED_ELSEWHERE) if n == "shapes-blip" else n for n in SHIPPED]
)
def test_retraining_from_the_seed_reproduces_the_shipped_weights_bit_for_bit(name, tmp_path):
    train(name, tmp_path, progress=False, held_out=0)
    shipped = load_file(organism_dir(name) / "model.safetensors")
    retrained = load_file(tmp_path / "model.safetensors")
    assert shipped.keys() == retrained.keys()
    assert all(torch.equal(shipped[k], retrained[k]) for k in shipped)


def test_cli_list_names_every_organism():
    result = CliRunner().invoke(app, ["list"])
    assert result.exit_code == 0 and all(name in result.output for name in NAMES)


@pytest.mark.parametrize("name", [*SHIPPED, *PLANTED])
def test_parameter_counts_are_the_shipped_weights(name):
    """`zoo list` and the organism's record count the weights that ship (both once said 411,458
    for shapes-blip, whose weights hold 444,482 since its vocabulary grew by 256 byte tokens)."""
    model = vt.load(name).model
    count = sum(p.numel() for p in model.parameters())
    record = json.loads((organism_dir(name) / "organism.json").read_text())
    assert parameter_count(organism_dir(name)) == count == record["parameters"]
    listed = CliRunner().invoke(app, ["list"]).output.splitlines()
    assert f"  {count:,} params  " in next(line for line in listed if line.startswith(f"{name}  "))


def test_cli_eval_ends_with_the_machine_readable_line():
    result = CliRunner().invoke(app, ["eval", "shapes-blip", "--n", "20"])
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 0 and last.startswith("zoo_eval shapes-blip visual=")
    assert [part.split("=")[0] for part in last.split()[2:]] == ["visual", "fact", "multi"]


def test_cli_eval_of_an_unknown_name_names_the_organisms():
    result = CliRunner().invoke(app, ["eval", "shapes-gpt"])
    assert result.exit_code != 0 and "shapes-llava" in result.output


def test_cli_train_writes_a_loadable_organism(tmp_path):
    out = tmp_path / "tiny"
    result = CliRunner().invoke(app, ["train", "shapes-blip", "--steps", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert set(evaluate(out, n=4)) >= set(TARGETS)
