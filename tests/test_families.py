"""Every family vlmtrace supports equals an independent plain-torch reference on a tiny model.

For each family module in `tests/families/`, the engine patches every site the family has,
under the three corruptions (symmetric token replacement of the visual phrase, a semantic
image pair, Gaussian noise on the image features), in both directions, with windows of 1 and
2 layers, over image, constraint and last positions, and knocks out image -> last attention.
A seeded sample of the cells (always including an image position and the last position) is
recomputed by `tests/reference.py`, one unbatched row at a time with plain hooks, and must
agree to 1e-5. The clean and corrupted baselines are compared too. Image pairs are of another
size (64x32 for a 32x32 image): the reference pairs positions by content itself (text before
the image by index, after it from the end, image tokens in order) and every question position
is compared, since the processor's size-dependent markup shifts them.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import random

import families
import numpy as np
import pytest
import reference as ref
import torch
from families.spec import Family
from PIL import Image

import vlmtrace as vt

FAMILIES: dict[str, Family] = {}
for info in pkgutil.iter_modules(families.__path__):
    if info.name != "spec":
        module = importlib.import_module(f"families.{info.name}")
        FAMILIES[module.FAMILY.name] = module.FAMILY

CORRUPTIONS = {
    "str": lambda: vt.SymmetricTokenReplacement("visual"),
    "image_pair": lambda: vt.ImagePair(),
    "noise": lambda: vt.GaussianNoise("image", scale=3.0, samples=2, seed=5),
}
CELLS_PER_SITE = 6
TOLERANCE = 1e-5


def picture(seed: int, size: tuple[int, int]) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@functools.cache
def loaded(name: str) -> vt.VLM:
    family = FAMILIES[name]
    model, processor = family.build()
    return vt.wrap(model, processor, name=f"tiny-{name}")


def sample_of(family: Family) -> vt.Sample:
    return vt.Sample(
        prompt=family.prompt,
        answer=family.answer,
        image=picture(0, family.image_size),
        image_pair=picture(1, family.pair_size or family.image_size),
        spans={"visual": "this shape", "textual": "year 2006"},
        replacements={"visual": family.replacement},
        id=family.name,
    )


def encode(vlm: vt.VLM, prompt: str, image) -> dict:
    return dict(vlm.processor(text=[prompt], images=[image], return_tensors="pt"))


def answer_id(vlm: vt.VLM, family: Family) -> int:
    """The answer's first token id, as the model would produce it after the prompt."""
    alone = vlm.tokenizer(family.prompt).input_ids
    joined = vlm.tokenizer(family.prompt + " " + family.answer).input_ids
    assert joined[: len(alone)] == alone
    return joined[len(alone)]


def positions_of(vlm: vt.VLM, tokens: list[int], segment: str, family: Family) -> list[int]:
    """Positions of a segment, found by the reference itself: image tokens by id, "last", or
    the tokens of "this shape" / "year 2006"."""
    if segment == "image":
        return [i for i, t in enumerate(tokens) if t == vlm.shape.image_token_id]
    if segment == "last":
        return [len(tokens) - 1]
    words = {"visual": "this shape", "textual": "year 2006"}[segment]
    ids = vlm.tokenizer(" " + words, add_special_tokens=False).input_ids
    for start in range(len(tokens)):
        if tokens[start : start + len(ids)] == ids:
            return list(range(start, start + len(ids)))
    raise AssertionError(f"{words!r} ({ids}) not found in {tokens}")


class Reference:
    """The reference's view of one (family, corruption): clean and corrupted runs of one row."""

    def __init__(self, vlm: vt.VLM, family: Family, corruption: str):
        self.model, self.family, self.corruption = vlm.model, family, corruption
        sample = sample_of(family)
        self.clean = encode(vlm, sample.prompt, sample.image)
        self.draws = 1
        if corruption == "str":
            self.corrupt = encode(vlm, sample.prompt.replace("this shape", family.replacement), sample.image)
        elif corruption == "image_pair":
            self.corrupt = encode(vlm, sample.prompt, sample.image_pair)
        else:
            self.corrupt = self.clean
            self.draws = 2
        self.width = self.clean["input_ids"].shape[-1]
        self.corrupt_width = self.corrupt["input_ids"].shape[-1]
        self.answer = answer_id(vlm, family)
        self.n_heads = vlm.shape.heads[vlm.adapter.default_stack]
        self.vlm = vlm

    def partner(self, position: int) -> int | None:
        """The corrupted run's position paired with clean `position`, by what it holds: itself when
        both runs have the same length; else the k-th image token with the k-th (None past the
        other image's last), text before the image at the same index, text after it at the same
        distance from the end (an image pair of another size changes only the image and the
        markup the processor writes around it; the text after it is the same)."""
        if self.corrupt_width == self.width:
            return position
        clean, corrupt = self.clean["input_ids"][0].tolist(), self.corrupt["input_ids"][0].tolist()
        image = self.vlm.shape.image_token_id
        if clean[position] == image:
            k = [i for i, t in enumerate(clean) if t == image].index(position)
            theirs = [i for i, t in enumerate(corrupt) if t == image]
            return theirs[k] if k < len(theirs) else None
        before_image = image is not None and position < clean.index(image)
        partner = position if before_image else self.corrupt_width - (self.width - position)
        assert clean[position] == corrupt[partner], (position, partner)
        return partner

    def noise(self, draw: int):
        if self.corruption != "noise":
            return lambda hooks: None
        return lambda hooks: ref.add_noise(
            hooks, self.model, self.family.image, scale=3.0, seed=5, samples=2, draw=draw
        )

    def score(self, inputs, hooks) -> float:
        return ref.log_prob(self.model, self.family.score, inputs, self.answer, hooks)

    def baselines(self) -> tuple[float, float]:
        clean = self.score(self.clean, lambda h: None)
        corrupt = np.mean([self.score(self.corrupt, self.noise(d)) for d in range(self.draws)])
        return clean, float(corrupt)

    def cell(self, site: str, layers, position: int, head, direction: str) -> float:
        at = self.family.sites[site]
        values = []
        partner = self.partner(position)
        if partner is None:
            return float("nan")  # no partner: nothing to patch
        for draw in range(self.draws):
            if direction == "denoise":  # corrupted run, clean activation restored
                source = ref.record(self.model, self.family.score, self.clean, at, layers)
                run_inputs, run_extra = self.corrupt, self.noise(draw)
                write = (partner, self.corrupt_width, position, self.width)
            else:  # clean run, corrupted activation patched in
                source = ref.record(self.model, self.family.score, self.corrupt, at, layers, self.noise(draw))
                run_inputs, run_extra = self.clean, lambda h: None
                write = (position, self.width, partner, self.corrupt_width)

            def hooks(registered, source=source, run_extra=run_extra, write=write):
                run_extra(registered)
                for layer in layers:
                    ref.replace(
                        registered,
                        self.model,
                        at,
                        layer,
                        write[0],
                        write[1],
                        source[layer],
                        head,
                        self.n_heads,
                        source_position=write[2],
                        source_width=write[3],
                    )

            values.append(self.score(run_inputs, hooks))
        return float(np.mean(values))


def chosen_cells(da, labels, rng, *, every: tuple[str, ...] = ()) -> list[dict]:
    """A seeded sample of one site's computed cells, always with an image and the last position,
    and every cell (of head 0, for head sites) at positions labelled with a segment in `every`."""
    cells = []
    for index in np.argwhere(~np.isnan(da.values)):
        cells.append(dict(zip(da.dims, index, strict=True)))
    must = [c for c in cells if labels[c["position"]] == "image"][:1]
    must += [c for c in cells if labels[c["position"]] == "last"][:1]
    must += [c for c in cells if labels[c["position"]] in every and c.get("head", 0) == 0]
    rest = rng.sample(cells, min(CELLS_PER_SITE, len(cells)))
    return must + rest


def resized_pair(family: Family, corruption: str) -> bool:
    """An image pair of another size: other numbers of image tokens and of processor markup."""
    return corruption == "image_pair" and family.pair_size not in (None, family.image_size)


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_site_equals_the_plain_torch_reference(name, direction, corruption):
    family = FAMILIES[name]
    if corruption in family.skip:
        pytest.skip(family.skip[corruption])
    vlm = loaded(name)
    stack = vlm.adapter.default_stack
    sites = tuple(site for site in family.sites if site in vlm.adapter.stacks[stack].sites)
    # pairs of another size shift the question: every question position is compared then
    every = ("question", "textual") if resized_pair(family, corruption) else ()
    ds = vt.patch(
        vlm,
        [sample_of(family)],
        corruption=CORRUPTIONS[corruption](),
        grid=vt.Grid(sites=sites, windows=(1, 2), segments=(*family.segments, *every)),
        metric=vt.LogProb(),
        direction=direction,
        progress=False,
    )
    reference = Reference(vlm, family, corruption)
    clean, corrupt = reference.baselines()
    assert float(ds["clean"][0]) == pytest.approx(clean, abs=TOLERANCE)
    assert float(ds["corrupt"][0]) == pytest.approx(corrupt, abs=TOLERANCE)
    assert abs(clean - corrupt) > 1e-3, "the corruption does not move the answer: nothing would be tested"
    labels = list(ds["label"].values[0])
    for k, position in enumerate(ds["index"].values[0]):  # unpaired where the reference finds no partner
        unpaired = str(ds["unpaired"].values[0][k])
        assert (reference.partner(int(position)) is None) == bool(unpaired), (position, unpaired)
    rng = random.Random(0)
    n_layers = vlm.shape.layers[stack]
    checked = 0
    for site in sites:
        da = ds[site].isel(sample=0)
        for cell in chosen_cells(da, labels, rng, every=every):
            window = int(da["window"][cell["window"]])
            centre = int(da["layer"][cell["layer"]])
            low, high = max(0, centre - window // 2), min(n_layers, centre - (-window // 2))
            layers = [layer for layer in range(low, high) if layer in vlm.shape.layers_with(stack, site)]
            position = int(ds["index"].values[0][cell["position"]])
            head = int(da["head"][cell["head"]]) if "head" in cell else None
            expected = reference.cell(site, layers, position, head, direction)
            got = float(da.values[tuple(cell.values())])
            assert got == pytest.approx(expected, abs=TOLERANCE), (site, window, centre, position, head)
            checked += 1
    assert checked >= len(sites) * 2


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_knockout_of_image_to_last_equals_the_plain_torch_reference(name):
    family = FAMILIES[name]
    if family.attention is None or "knockout" in family.skip:
        pytest.skip(family.skip.get("knockout", "no self-attention knockout"))
    vlm = loaded(name)
    sample = sample_of(family)
    n_layers = vlm.shape.layers[vlm.adapter.default_stack]
    keys_segment, queries_segment = family.knockout
    blocks = {"block": (keys_segment, queries_segment)}
    ds = vt.knockout(vlm, [sample], blocks=blocks, windows=(1, 2), progress=False, metric=vt.LogProb())
    reference = Reference(vlm, family, "image_pair")
    tokens = reference.clean["input_ids"][0].tolist()
    keys = positions_of(vlm, tokens, keys_segment, family)
    queries = positions_of(vlm, tokens, queries_segment, family)
    assert keys and queries, "the knockout block has no positions"
    for window in (1, 2):
        for centre in range(n_layers):
            layers = range(max(0, centre - window // 2), min(n_layers, centre - (-window // 2)))

            def hooks(registered, layers=layers):
                for layer in layers:
                    if family.attention_layers is not None and layer not in family.attention_layers:
                        continue
                    ref.knock_out(
                        registered,
                        vlm.model,
                        family.attention,
                        layer,
                        "attention_mask",
                        queries,
                        keys,
                        causal=family.causal,
                    )

            expected = reference.score(reference.clean, hooks)
            got = float(ds["knockout"].sel(block="block", window=window, layer=centre).squeeze())
            assert got == pytest.approx(expected, abs=TOLERANCE), (window, centre)
    assert float(ds["clean"][0]) == pytest.approx(
        reference.score(reference.clean, lambda h: None), abs=TOLERANCE
    )


torch.set_num_threads(1)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_attention_patterns_are_probabilities_over_the_prompt(name):
    family = FAMILIES[name]
    if "patterns" in family.skip:
        pytest.skip(family.skip["patterns"])
    from vlmtrace.engine.attention import attention_pattern

    vlm = loaded(name)
    pattern = attention_pattern(vlm, sample_of(family), kind="self", query="last")
    assert pattern.sizes["layer"] == vlm.shape.layers[vlm.adapter.default_stack]
    sums = pattern.sum("key", skipna=False).values  # NaN: layers without this attention
    assert not np.isnan(sums).all()
    np.testing.assert_allclose(sums[~np.isnan(sums)], 1.0, atol=1e-4)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_prefix_reuse_equals_the_plain_sweep(name):
    family = FAMILIES[name]
    if "prefix_reuse" in family.skip:
        pytest.skip(family.skip["prefix_reuse"])
    vlm = loaded(name)
    stack = vlm.adapter.stacks[vlm.adapter.default_stack]
    sites = tuple(site for site in ("block", "attn") if site in stack.sites)
    kwargs = dict(
        corruption=vt.SymmetricTokenReplacement("visual"),
        grid=vt.Grid(sites=sites, windows=(1, 2), segments=family.segments),
        progress=False,
    )
    plain = vt.patch(vlm, [sample_of(family)], **kwargs)
    reused = vt.patch(vlm, [sample_of(family)], reuse_prefix=True, **kwargs)
    for variable in (*sites, "clean", "corrupt"):
        np.testing.assert_allclose(
            reused[variable].values, plain[variable].values, atol=1e-6, err_msg=variable
        )


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_max_memory_reads_each_familys_config_and_leaves_the_values_alone(name, monkeypatch):
    """`sweep.row_bytes` reads the language model's config (heads, MLP width, attention kind); a
    budget of one byte gives every forward the fewest rows it can hold: the clean and corrupted
    rows and one cell."""
    import vlmtrace.engine.sweep as sweep

    family = FAMILIES[name]
    vlm = loaded(name)
    stack = vlm.adapter.stacks[vlm.adapter.default_stack]
    site = "block" if "block" in stack.sites else sorted(stack.sites)[0]
    kwargs = dict(
        corruption=vt.SymmetricTokenReplacement("visual"),
        grid=vt.Grid(sites=(site,), segments=family.segments),
        progress=False,
    )
    plain = vt.patch(vlm, [sample_of(family)], **kwargs)
    original, rows = sweep.run_plans, []

    def counting(vlm, plans, *args, **kwargs):
        rows.extend(plan.rows for plan in plans)
        return original(vlm, plans, *args, **kwargs)

    monkeypatch.setattr(sweep, "run_plans", counting)
    small = vt.patch(vlm, [sample_of(family)], max_memory=1, **kwargs)
    assert set(rows) == {3}
    np.testing.assert_allclose(small[site].values, plain[site].values, atol=1e-6)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_no_forward_of_a_sweep_builds_a_kv_cache(name):
    """A sweep's forward is never continued, so each adapter's forward asks for no cache (see
    `llava.forward`): one holds every layer's keys and values for every row, twice the rest of a
    row's memory on 7B shapes. Any module output carrying a cache fails it."""
    family = FAMILIES[name]
    vlm = loaded(name)
    stack = vlm.adapter.stacks[vlm.adapter.default_stack]
    site = "block" if "block" in stack.sites else sorted(stack.sites)[0]
    built = []

    def look(module, args, output):
        if getattr(output, "past_key_values", None) is not None:
            built.append(type(module).__name__)

    hooks = [module.register_forward_hook(look) for module in vlm.model.modules()]
    try:  # verify=False: the self-check's own forward is the model's `generate`, which caches
        vt.patch(
            vlm,
            [sample_of(family)],
            corruption=vt.SymmetricTokenReplacement("visual"),
            grid=vt.Grid(sites=(site,), segments=family.segments),
            progress=False,
            verify=False,
        )
    finally:
        for hook in hooks:
            hook.remove()
    assert built == []


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_qk_fix_reads_queries_and_keys_that_reproduce_each_familys_attention(name):
    """AtP*'s QK fix recomputes the softmax from the queries, keys, scale and mask that
    `Stack.scores` declares, and stops (QKFixError) unless they reproduce the model's own
    pattern at every layer it reads; a stack that declares none refuses the fix by name."""
    from vlmtrace.engine.qk_fix import QKFixError

    family = FAMILIES[name]
    vlm = loaded(name)
    kwargs = dict(
        corruption=vt.SymmetricTokenReplacement("visual"),
        grid=vt.Grid(sites=("block",), segments=("visual", "last")),
        metric=vt.LogProb(),
        method="atp+qk",
        progress=False,
    )
    if vlm.adapter.stacks[vlm.adapter.default_stack].scores is None:
        with pytest.raises(QKFixError, match="Stack.scores"):
            vt.attribute(vlm, [sample_of(family)], **kwargs)
        return
    estimates = vt.attribute(vlm, [sample_of(family)], **kwargs)
    assert np.isfinite(estimates["block"].sel(layer=0).values).all()
