"""Specification of the synthetic scenes and their questions (vlmtrace.data.scenes)."""

from __future__ import annotations

import random
from dataclasses import fields

import numpy as np
import pytest

from vlmtrace.data.drawing import (
    KINDS,
    Shape,
    random_scene,
    render,
    split_of,
    with_shape,
)
from vlmtrace.data.mascots import CITIES, ENTITIES, YEARS, city_in_year, mascot_city
from vlmtrace.data.scenes import (
    FAMILIES,
    IMAGE_TOKEN,
    TEMPLATES,
    VOCABULARY,
    ask,
    for_blip,
    make_samples,
)

N = 60  # questions per family in these checks; enough to meet every template many times


def _questions(template: str, n: int = N, split: str = "test"):
    rng = random.Random(f"test/{template}")
    return [ask(rng, template, split=split) for _ in range(n)]


def _pixels(sample) -> bytes:
    return np.asarray(sample.image).tobytes()


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_gives_identical_samples(family):
    a, b = make_samples(family, 20, seed=3), make_samples(family, 20, seed=3)
    assert [(s.prompt, s.answer, s.spans, s.replacements, s.foil) for s in a] == [
        (s.prompt, s.answer, s.spans, s.replacements, s.foil) for s in b
    ]
    assert [_pixels(s) for s in a] == [_pixels(s) for s in b]


def test_different_seeds_give_different_scenes():
    a, b = make_samples("multi", 20, seed=0), make_samples("multi", 20, seed=1)
    assert [_pixels(s) for s in a] != [_pixels(s) for s in b]


@pytest.mark.parametrize("split", ["train", "test"])
def test_questions_only_show_scenes_of_their_split(split):
    for template in TEMPLATES:
        assert {split_of(q.scene) for q in _questions(template, 20, split)} == {split}


def test_train_and_test_samples_share_no_image():
    train = {_pixels(s) for f in FAMILIES for s in make_samples(f, 200, seed=0, split="train")}
    test = {_pixels(s) for f in FAMILIES for s in make_samples(f, 200, seed=0, split="test")}
    assert not train & test


@pytest.mark.parametrize("family", FAMILIES)
def test_spans_occur_verbatim_in_the_prompt(family):
    for s in make_samples(family, N, seed=0):
        for phrase in s.spans.values():
            assert f" {phrase} " in f" {s.prompt} "


@pytest.mark.parametrize("family", FAMILIES)
def test_replacements_have_the_token_count_of_their_span_and_differ(family):
    for s in make_samples(family, N, seed=0):
        for name, phrase in s.replacements.items():
            assert len(phrase.split()) == len(s.spans[name].split()) and phrase != s.spans[name]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_prompt_word_and_answer_is_one_vocabulary_token(family):
    vocabulary = set(VOCABULARY) | {IMAGE_TOKEN}
    for s in make_samples(family, N, seed=0):
        assert set(s.prompt.split()) <= vocabulary and s.answer in vocabulary


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_counterfactual_changes_the_answer(template):
    for q in _questions(template):
        assert all(answer != q.answer for answer in q.answers.values())


@pytest.mark.parametrize("template", [t for t in TEMPLATES if t not in ("count",)])
def test_phrase_replacement_answers_are_what_the_replaced_question_asks(template):
    for q in _questions(template):
        if template.startswith("named"):
            entity = tuple(q.replacements["visual"].split()[1:])
        else:
            selector = q.replacements["visual"].split()[1]
            shape = next(s for s in q.scene if selector in (s.colour, s.kind))
            entity = (shape.colour, shape.kind)
        if template in ("kind", "colour", "side"):
            expected = getattr(shape, template)
        elif "year" in q.meta:
            expected = city_in_year(entity, q.meta["year"])
        else:
            expected = mascot_city(entity)
        assert q.answers["visual"] == expected


def _changes(scene, pair) -> list[tuple[int, str]]:
    return [
        (i, f.name)
        for i, (a, b) in enumerate(zip(scene, pair, strict=False))
        for f in fields(Shape)
        if getattr(a, f.name) != getattr(b, f.name)
    ]


@pytest.mark.parametrize("template", ["kind", "colour", "side", "fact", "multi"])
def test_image_pairs_change_exactly_one_attribute_of_the_selected_shape(template):
    for q in _questions(template):
        hidden = "kind" if q.meta["selected_by"] == "colour" else "colour"
        attribute = "cell" if template == "side" else hidden
        assert _changes(q.scene, q.pair) == [(q.meta["selected"], attribute)]


def test_count_image_pairs_add_or_remove_one_shape_and_keep_the_others():
    for q in _questions("count"):
        small, large = sorted((q.scene, q.pair), key=len)
        assert len(large) == len(small) + 1 and large[: len(small)] == small


@pytest.mark.parametrize("template", ["kind", "colour", "fact", "multi"])
def test_image_pairs_differ_only_where_the_changed_shape_is_drawn(template):
    for q in _questions(template, 20):
        index = q.meta["selected"]
        changed = np.any(render(q.scene) != render(q.pair), axis=-1)
        covered = np.any(render((q.scene[index],)) | render((q.pair[index],)), axis=-1)
        assert changed.any() and not (changed & ~covered).any()


def test_named_questions_have_no_image_pair_since_the_picture_cannot_move_their_answer():
    assert all(s.image_pair is None for s in make_samples("named", N, seed=0))


def test_the_foil_is_the_answer_of_the_image_pair():
    for s in make_samples("fact", N, seed=0):
        assert s.foil == s.meta["answers"]["image_pair"]


def test_scenes_name_every_shape_by_colour_or_kind_uniquely():
    rng = random.Random(0)
    for _ in range(200):
        scene = random_scene(rng, objects=3)
        assert len({s.colour for s in scene}) == len({s.kind for s in scene}) == len(scene)
        assert len({s.cell for s in scene}) == len(scene)


def test_each_kind_is_drawn_differently():
    drawings = {render((Shape("red", k, "large", (1, 1)),)).tobytes() for k in KINDS}
    assert len(drawings) == len(KINDS)


def test_with_shape_changes_only_the_given_shape():
    scene = random_scene(random.Random(1), objects=3)
    assert _changes(scene, with_shape(scene, 2, size="small" if scene[2].size == "large" else "large")) == [
        (2, "size")
    ]


def test_multi_constraint_table_gives_each_entity_a_different_city_every_year():
    for entity in ENTITIES:
        assert len({city_in_year(entity, y) for y in YEARS}) == len(YEARS)


def test_multi_constraint_table_gives_each_year_a_different_city_per_entity():
    for year in YEARS:
        assert len({city_in_year(e, year) for e in ENTITIES}) == len(ENTITIES)


def test_every_city_is_the_mascot_city_of_exactly_one_entity():
    assert sorted(mascot_city(e) for e in ENTITIES) == sorted(CITIES)


def test_for_blip_drops_the_image_placeholder_and_keeps_the_spans():
    s = for_blip(make_samples("multi", 1, seed=0)[0])
    assert IMAGE_TOKEN not in s.prompt and all(p in s.prompt for p in s.spans.values())


def test_unknown_family_error_lists_the_families():
    with pytest.raises(ValueError, match="visual"):
        make_samples("colours", 1, seed=0)
