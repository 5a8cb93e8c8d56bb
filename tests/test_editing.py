"""vt.edit: closed-form MLP edits that change what a model says, and nothing behind its back."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import random_image

import vlmtrace as vt
from vlmtrace.data.scene_edits import locality, new_answer, scene_edit_case
from vlmtrace.data.scenes import make_samples
from vlmtrace.engine.editing import (  # the same forward the edit uses
    Contexts,
    Edit,
    EditError,
    Parts,
    check_disjoint,
    edit,
    evaluate,
    key_covariance,
    least_squares_update,
    measure_key_covariance,
)
from vlmtrace.engine.editing.contexts import encode_row
from vlmtrace.engine.editing.parts import forward_rows, output_of


def logits_of(vlm: vt.VLM, sample: vt.Sample) -> torch.Tensor:
    row = encode_row(vlm, sample, sample.answer, "visual", "prompt").inputs
    with torch.no_grad():
        return forward_rows(vlm, [row])[0][0]


@pytest.fixture(scope="module")
def organism() -> vt.VLM:
    return vt.load("shapes-llava")


@pytest.fixture(scope="module")
def ordinary() -> list[vt.Sample]:
    return make_samples("fact", 12, seed=5, split="train") + make_samples("visual", 12, seed=5, split="train")


def test_a_rank_one_edit_with_zero_change_leaves_logits_unchanged(tiny_llava, llava_sample):
    parts = Parts.of(tiny_llava)
    keys = torch.randn(1, parts.weight(1).shape[1], generator=torch.Generator().manual_seed(0))
    delta = least_squares_update(keys, torch.zeros(1, parts.weight(1).shape[0]), torch.eye(keys.shape[1]))
    before = logits_of(tiny_llava, llava_sample)
    with Edit(tiny_llava, {1: delta}):
        after = logits_of(tiny_llava, llava_sample)
    assert torch.equal(before, after)


def test_the_closed_form_equals_a_direct_least_squares_solve(tiny_llava, llava_sample):
    """ΔW = R Kᵀ (C + K Kᵀ)⁻¹ with C = λ mean k kᵀ is the lstsq solution over stacked keys."""
    parts = Parts.of(tiny_llava)
    weight = parts.weight(0).detach().double()
    ordinary_keys = []
    hook = parts.projections[0].register_forward_pre_hook(lambda m, a: ordinary_keys.append(a[0][0]))
    with torch.no_grad():
        for seed in range(12):  # more ordinary keys than the projection has inputs
            logits_of(tiny_llava, llava_sample.with_(image=random_image(seed)))
    hook.remove()
    k0 = torch.cat(ordinary_keys).double()  # [N, in]
    weight_of_preserving = 7.0
    covariance = weight_of_preserving * k0.T @ k0 / len(k0)
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn(3, weight.shape[1], generator=generator, dtype=torch.float64)
    values = torch.randn(3, weight.shape[0], generator=generator, dtype=torch.float64)
    closed = least_squares_update(keys, values - keys @ weight.T, covariance).double()
    # min |W' [K, s K0] - [V, s W K0]|² over W' (s² = λ / N), solved directly
    scale = (weight_of_preserving / len(k0)) ** 0.5
    inputs = torch.cat([keys, scale * k0])
    targets = torch.cat([values, scale * k0 @ weight.T])
    direct = torch.linalg.lstsq(inputs, targets).solution.T - weight
    torch.testing.assert_close(closed, direct, rtol=1e-4, atol=1e-5)


def test_restoring_the_weights_returns_the_exact_original_logits(organism, ordinary):
    sample = make_samples("fact", 1, seed=3)[0]
    before = logits_of(organism, sample)
    changed = edit(organism, [(sample, "avalor")], layers=(4,), preserve=ordinary, span="last", steps=5)
    changed.apply()
    assert not torch.equal(logits_of(organism, sample), before)
    changed.restore()
    assert torch.equal(logits_of(organism, sample), before)


def test_edit_does_not_change_the_weights_until_applied(organism, ordinary):
    sample = make_samples("fact", 1, seed=3)[0]
    original = Parts.of(organism).weight(4).detach().clone()
    edit(organism, [(sample, "avalor")], layers=(3, 4), preserve=ordinary, span="last", steps=5)
    assert torch.equal(Parts.of(organism).weight(4), original)


def test_the_value_optimisation_builds_no_graph_below_the_edit_and_restores_every_flag(organism, ordinary):
    """δ is optimised with the weights frozen (the graph starts at δ: nothing below the edit layer
    keeps activations), and each weight's own requires_grad flag comes back, whatever it was."""
    sample = make_samples("fact", 1, seed=3)[0]
    parameters = list(organism.model.parameters())
    flags = [p.requires_grad for p in parameters]
    frozen = parameters[::7]  # a user's partly frozen model keeps its choice
    for p in frozen:
        p.requires_grad_(False)
    try:
        wanted = [p.requires_grad for p in parameters]
        below = []  # does layer 0, under the edit layers, build a graph in any forward?
        first = Parts.of(organism).layers[0]
        handle = first.register_forward_hook(lambda m, args, out: below.append(output_of(out).requires_grad))
        try:
            edit(organism, [(sample, "avalor")], layers=(3, 4), preserve=ordinary, span="last", steps=3)
        finally:
            handle.remove()
        assert len(below) > 3 and not any(below)
        assert [p.requires_grad for p in parameters] == wanted
    finally:
        for p, flag in zip(parameters, flags, strict=True):
            p.requires_grad_(flag)


def test_a_key_covariance_measured_once_gives_the_edit_that_preserve_gives(organism, ordinary):
    sample = make_samples("fact", 1, seed=3)[0]
    request = [(sample, "avalor")]
    direct = edit(organism, request, layers=(3, 4), preserve=ordinary, span="last", steps=3)
    measured = measure_key_covariance(organism, ordinary, (2, 3, 4))  # a superset of the layers serves
    reused = edit(organism, request, layers=(3, 4), covariance=measured, span="last", steps=3)
    assert all(torch.equal(direct.deltas[layer], reused.deltas[layer]) for layer in (3, 4))
    assert reused.attr("hyperparameters")["preserve_samples"] == len(ordinary)


def test_a_key_covariance_is_refused_for_other_layers_other_weights_or_another_model(
    organism, ordinary, tiny_llava, llava_sample
):
    sample = make_samples("fact", 1, seed=3)[0]
    request = [(sample, "avalor")]
    measured = measure_key_covariance(organism, ordinary, (3,))
    with pytest.raises(EditError, match=r"holds layers \[3\], not \[4\]"):
        edit(organism, request, layers=(3, 4), covariance=measured, span="last", steps=1)
    change = edit(organism, request, layers=(3,), covariance=measured, span="last", steps=1)
    with change, pytest.raises(EditError, match="weights were written"):
        edit(organism, request, layers=(3,), covariance=measured, span="last", steps=1)
    # restored exactly, the weights are those it was measured on again, also after nested edits
    with change:
        inner = edit(organism, request, layers=(4,), preserve=ordinary, span="last", steps=1)
        with inner:
            pass
    edit(organism, request, layers=(3,), covariance=measured, span="last", steps=1)
    # but not when something else was written while the edit was applied
    bias = next(p for p in organism.model.parameters() if p.dim() == 1)
    with change, torch.no_grad():
        bias.add_(0.0)  # the same values, written: nothing proves them equal
    with pytest.raises(EditError, match="weights were written"):
        edit(organism, request, layers=(3,), covariance=measured, span="last", steps=1)
    with pytest.raises(EditError, match="another model object"):
        edit(tiny_llava, [(llava_sample, "rome")], layers=(1,), covariance=measured, steps=1)
    twin = vt.load("shapes-llava")  # the same name and weights, but another object: refused too
    with pytest.raises(EditError, match="another model object"):
        edit(twin, request, layers=(3,), covariance=measured, span="last", steps=1)
    of_twin = measure_key_covariance(twin, ordinary, (3,))
    twin.model.to(torch.float64)  # a cast writes no parameter in place, yet the keys are not those measured
    with pytest.raises(EditError, match="cast, moved or replaced"):
        edit(twin, request, layers=(3,), covariance=of_twin, span="last", steps=1)
    with pytest.raises(EditError, match="not both"):
        edit(organism, request, layers=(3,), preserve=ordinary, covariance=measured, steps=1)


def test_an_edit_at_the_traced_layers_makes_the_organism_give_the_new_answers(organism, ordinary):
    samples = make_samples("fact", 3, seed=11)
    new = ["avalor" if s.answer != "avalor" else "brenmoor" for s in samples]
    changed = edit(
        organism, list(zip(samples, new, strict=True)), layers=(3, 4, 5), preserve=ordinary, span="last"
    )
    with changed:
        said = [
            organism.tokenizer.decode([int(logits_of(organism, s)[-1].argmax())]).strip() for s in samples
        ]
    assert said == new


def test_an_edit_round_trips_through_zarr_with_its_provenance(organism, ordinary, tmp_path):
    sample = make_samples("fact", 1, seed=3)[0]
    changed = edit(organism, [(sample, "avalor")], layers=(4, 5), preserve=ordinary, span="last", steps=3)
    vt.save(changed.to_dataset(), tmp_path / "edit.zarr")
    loaded = Edit.from_dataset(organism, vt.open_result(tmp_path / "edit.zarr"))
    assert loaded.layers == (4, 5) and all(torch.equal(loaded.deltas[x], changed.deltas[x]) for x in (4, 5))


def test_the_recipes_specificity_set_is_disjoint_from_the_edit_set(organism):
    from vlmtrace.data.scene_edits import locality
    from vlmtrace.recipes.multimodal_edit import default_samples

    samples = default_samples(organism, 8, seed=0)
    entities = {s.meta["entity"] for s in samples}
    text, image = locality(entities, 8, seed=0)
    specificity = text + image
    in_view = {(x["colour"], x["kind"]) for s in specificity for x in s.meta["scene"]}
    assert specificity and not in_view & entities


def test_evaluate_refuses_a_specificity_set_that_shares_an_edited_entity(organism, ordinary):
    samples = make_samples("fact", 2, seed=3)
    changed = Edit(organism, {4: torch.zeros_like(Parts.of(organism).weight(4))})
    changed.attrs["requests"] = [{"prompt": "x", "image": None, "entity": list(samples[0].meta["entity"])}]
    with pytest.raises(EditError, match="overlap the edit"):
        check_disjoint(changed, [samples[1], samples[0]])


def test_evaluate_reports_scores_side_by_side_with_the_unedited_model(organism, ordinary):
    samples = make_samples("fact", 2, seed=11)
    others = [s for s in make_samples("fact", 10, seed=12) if s.meta["entity"] != samples[0].meta["entity"]]
    changed = edit(organism, [(samples[0], "avalor")], layers=(4, 5), preserve=ordinary, span="last")
    ds = evaluate(organism, changed, reliability=[samples[0].with_(answer="avalor")],
                  image_locality=others[:4], seed=random.Random(0).randrange(10))  # fmt: skip
    assert ds["score"].sel(metric="efficacy").values.tolist() == [0.0, 1.0]


def test_edit_refuses_blip_style_models_naming_the_families_it_edits(tiny_blip, blip_sample):
    with pytest.raises(EditError, match="BLIP-style"):
        edit(tiny_blip, [(blip_sample, "rome")], layers=(0,), preserve=[blip_sample])


def test_key_covariance_averages_over_every_token_of_the_ordinary_inputs(tiny_llava, llava_sample):
    parts = Parts.of(tiny_llava)
    covariance = key_covariance(tiny_llava, parts, [llava_sample, llava_sample], [0])[0]
    seen = []
    hook = parts.projections[0].register_forward_pre_hook(lambda m, a: seen.append(a[0][0]))
    logits_of(tiny_llava, llava_sample)
    hook.remove()
    keys = seen[0].double()
    torch.testing.assert_close(covariance, keys.T @ keys / len(keys))


def plain_keys(vlm: vt.VLM, samples: list[vt.Sample], layer: int) -> list[torch.Tensor]:
    """Each sample's keys at `layer` (input of its MLP output projection), one unpadded forward of
    the model on the processor's own output per sample: [tokens, intermediate] float64."""
    projection = vlm.model.model.language_model.layers[layer].mlp.down_proj
    seen = []
    hook = projection.register_forward_pre_hook(lambda m, a: seen.append(a[0][0].double()))
    with torch.no_grad():
        for sample in samples:
            inputs = vlm.processor(text=[sample.prompt], images=[sample.image], return_tensors="pt")
            vlm.model(**inputs)
    hook.remove()
    return seen


def test_memit_over_contexts_keys_on_every_context_and_records_them(organism, ordinary):
    """One layer, keys="each": every context's residual is the same δ, so the update must be
    ΔW = δ uᵀ with u = (C + KᵀK)⁻¹ Σ_c k_c over the keys of *all* contexts (read here with a plain
    hook at each context's last token) and C from every token of the preserved samples."""
    sample = make_samples("fact", 1, seed=3)[0]
    case = scene_edit_case(sample, new_answer(sample.meta["entity"], random.Random(0)), seed=0)
    contexts = Contexts(images=2, paraphrases=1, prefixes=1, prefix_lengths=(3,))
    changed = edit(
        organism, [case.request], layers=(5,), preserve=ordinary, span="last", contexts=contexts, steps=3
    )
    record = changed.attr("requests")[0]["contexts"]
    assert {k: record[k] for k in ("prompt", "image", "paraphrase", "prefix")} == {
        "prompt": 1, "image": 2, "paraphrase": 1, "prefix": 1,
    }  # fmt: skip
    assert changed.attr("contexts")["prefixes"] == 1 and len(record["prefixes"][0].split()) == 3
    question = sample.prompt.removeprefix("<image> ")
    used = [sample, *case.request.images[:2], *case.request.paraphrases[:1]]
    used.append(sample.with_(prompt=f"<image> {record['prefixes'][0]} {question}"))
    keys = torch.stack([k[-1] for k in plain_keys(organism, used, 5)])
    every = torch.cat(plain_keys(organism, ordinary, 5))
    covariance = 1000.0 * every.T @ every / len(every)
    u = torch.linalg.solve(covariance + keys.T @ keys, keys.sum(0))
    delta = changed.deltas[5].double()
    value = delta @ u / (u @ u)
    torch.testing.assert_close(delta, torch.outer(value, u), rtol=1e-3, atol=1e-4 * float(delta.abs().max()))
    assert float(value.norm()) == pytest.approx(changed.attr("requests")[0]["delta_norm"], rel=1e-3)


def test_multedit_moves_the_single_key_by_a_ridge_step_and_gives_the_new_answer(organism):
    """Basu et al.: ΔW = r kᵀ (λI + k kᵀ)⁻¹ = r kᵀ / (λ + |k|²), k the request's own key."""
    sample = make_samples("fact", 1, seed=3)[0]
    new = "avalor" if sample.answer != "avalor" else "brenmoor"
    changed = edit(organism, [(sample, new)], layers=(5,), method="multedit", span="last", ridge=0.01)
    assert changed.attr("method") == "multedit" and changed.attr("hyperparameters")["ridge"] == 0.01
    (key,) = [k[-1] for k in plain_keys(organism, [sample], 5)]
    delta = changed.deltas[5].double()
    residual = delta @ key * (0.01 + key @ key) / (key @ key)
    expected = torch.outer(residual, key) / (0.01 + key @ key)
    torch.testing.assert_close(delta, expected, rtol=1e-3, atol=1e-4 * float(delta.abs().max()))
    with changed:
        said = organism.tokenizer.decode([int(logits_of(organism, sample)[-1].argmax())]).strip()
    assert said == new


def test_multedit_refuses_contexts_and_several_layers(organism, ordinary):
    sample = make_samples("fact", 1, seed=3)[0]
    with pytest.raises(EditError, match="own input only"):
        edit(organism, [(sample, "avalor")], layers=(5,), method="multedit", contexts=Contexts(images=2))
    with pytest.raises(EditError, match="edits one layer"):
        edit(organism, [(sample, "avalor")], layers=(4, 5), method="multedit", steps=1)
    with pytest.raises(EditError, match="choose 'memit'"):
        edit(organism, [(sample, "avalor")], layers=(5,), method="rome", preserve=ordinary)


def test_locality_and_portability_are_scored_against_plain_forwards(organism, ordinary):
    """Locality: the share of answer tokens whose edited argmax is the unedited argmax, and the KL
    between them; portability: hits on its own target. Both computed here from plain logits."""
    sample = make_samples("fact", 1, seed=11)[0]
    entity = sample.meta["entity"]
    text, image = locality({entity}, 2, seed=0)
    text = [s.with_(answer="red") for s in text]  # locality ignores the reference answer (MMEdit)
    ported = sample.with_(answer="avalor", id="ported", meta={**sample.meta, "probe": "portability"})
    changed = edit(organism, [(sample, "brenmoor")], layers=(4, 5), preserve=ordinary, span="last", steps=10)
    ds = evaluate(organism, changed, reliability=[sample.with_(answer="brenmoor")], portability=[ported],
                  text_locality=text, image_locality=image)  # fmt: skip
    before = [logits_of(organism, s)[-1].log_softmax(-1) for s in text + image]
    with changed:
        after = [logits_of(organism, s)[-1].log_softmax(-1) for s in text + image]
    local = ds.sel(item=ds["set"].isin(["text_locality", "image_locality"]))
    hits = [float(b.argmax() == a.argmax()) for b, a in zip(before, after, strict=True)]
    kls = [float((b.exp() * (b - a)).sum()) for b, a in zip(before, after, strict=True)]
    assert local["correct"].sel(model="edited").values.tolist() == hits
    np.testing.assert_allclose(local["kl"].values, kls, rtol=1e-4, atol=1e-6)
    assert float(ds["locality_kl"]) == pytest.approx(np.mean(kls), rel=1e-4)
    assert float(ds["score"].sel(metric="specificity", model="edited")) == pytest.approx(np.mean(hits))
    target = organism.tokenizer.convert_tokens_to_ids("avalor")
    hit = float(logits_of(organism, ported)[-1].argmax() == target)
    assert ds["correct"].sel(item=ds["set"] == "portability", model="unedited").values.tolist() == [hit]
    assert {
        "reliability",
        "portability",
        "text_locality",
        "image_locality",
        "efficacy",
        "specificity",
    } <= set(ds["metric"].values)


@pytest.mark.slow
def test_the_recipe_meets_the_issues_targets_and_contexts_are_what_generalises(organism):
    """`vlmtrace recipe multimodal_edit` at n=8 (about 2 minutes on 2 cores): MEMIT over contexts
    at the traced layer reaches efficacy >= 0.95, generalisation >= 0.85, specificity >= 0.95,
    and the same edit computed on the request alone generalises less."""
    import vlmtrace.recipes as registry

    recipe = registry.get("multimodal_edit")
    ds = recipe.run(organism, recipe.default_samples(organism, 8, 0), options=vt.Options(progress=False))
    score = ds["score"].sel(model="edited")
    memit = score.sel(condition="insert/memit/last/traced")
    assert float(memit.sel(metric="efficacy")) >= 0.95
    assert float(memit.sel(metric="generalisation")) >= 0.85
    assert float(memit.sel(metric="specificity")) >= 0.95
    single = score.sel(condition="insert/memit/last/single", metric="generalisation")
    assert float(single) < float(memit.sel(metric="generalisation")) - 0.2
