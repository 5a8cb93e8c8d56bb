"""Clean and corrupted positions are paired by what they hold, never by index within a segment.

The processor writes markup whose amount depends on the image (Idefics3's `<row_i_col_j>`
tags): it is its own segment, so the question after it pairs word with word. Whatever has no
partner is left unpatched, and the result says why.
"""

from __future__ import annotations

import numpy as np
from families import idefics3
from PIL import Image

import vlmtrace as vt
from vlmtrace.engine.alignment import align
from vlmtrace.engine.inputs import encode
from vlmtrace.engine.positions import Segments


def picture(size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(
        np.random.RandomState(0).randint(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    )


def segments(labels: str, ids: list[int]) -> Segments:
    return Segments(tokens=tuple(map(str, ids)), labels=tuple(labels.split()), ids=tuple(ids))


def test_processor_tags_are_markup_and_the_question_pairs_word_with_word():
    model, processor = idefics3.build()
    vlm = vt.wrap(model, processor, name="tiny-idefics3")
    sides = [
        encode(
            vlm, prompt=idefics3.PROMPT, image=picture(size), spans={"visual": "this shape"}, answer_ids=(5,)
        )
        for size in ((32, 32), (64, 32))  # 2x2 sub-images + global view; 1x2 + global view
    ]
    clean, corrupt = (side.prompt for side in sides)
    tags = [t for t, label in zip(clean.tokens, clean.labels, strict=True) if label == "markup"]
    assert "<row_2_col_2>" in tags and "<global-img>" in tags
    assert "question" not in {clean.labels[clean.tokens.index(tag)] for tag in tags}
    aligned = align(clean, corrupt)
    for word in ("User:", "which", "did", "represent", "?", "Assistant:"):
        assert corrupt.tokens[aligned.pairs[clean.tokens.index(word)]] == word
    assert corrupt.tokens[aligned.pairs[clean.tokens.index("<row_1_col_2>")]] == "<row_1_col_2>"
    assert "clean image only" in aligned.reasons[clean.tokens.index("<row_2_col_1>")]
    image = [p for p, label in enumerate(clean.labels) if label == "image"]
    theirs = [p for p, label in enumerate(corrupt.labels) if label == "image"]
    assert [aligned.pairs[p] for p in image[: len(theirs)]] == theirs  # k-th image token with k-th
    assert aligned.reasons[image[-1]] == "the corrupted image has fewer image tokens (12 of 20)"


def test_an_image_pair_labels_its_corrupted_side_as_its_own_ids_say():
    """The corrupted side of an image pair reuses the clean side's labels only where the
    processor gave it the same ids; an image of another size is labelled from its own ids."""
    model, processor = idefics3.build()
    vlm = vt.wrap(model, processor, name="tiny-idefics3")
    spans = {"visual": "this shape"}
    for other_size in ((32, 32), (64, 32)):  # same ids as the clean side; more image tokens and tags
        sample = vt.Sample(
            prompt=idefics3.PROMPT,
            answer="red",
            image=picture((32, 32)),
            image_pair=picture(other_size),
            spans=spans,
        )
        pair = vt.ImagePair().pair(vlm, sample, (5,))
        alone = encode(vlm, prompt=sample.prompt, image=sample.image_pair, spans=spans, answer_ids=(5,))
        assert pair.corrupt.prompt == alone.prompt
        assert (pair.corrupt.prompt is pair.clean.prompt) == (other_size == (32, 32))


def test_a_shorter_replacement_leaves_its_surplus_clean_tokens_unpaired_and_the_rest_aligned():
    clean = segments("special question visual visual visual question last", [1, 5, 7, 8, 9, 6, 4])
    corrupt = segments("special question visual question last", [1, 5, 3, 6, 4])
    aligned = align(clean, corrupt)
    assert aligned.pairs == {0: 0, 1: 1, 2: 2, 5: 3, 6: 4}
    assert aligned.reasons[3] == "the replacement for span 'visual' has fewer tokens (1 of 3)"


def test_text_that_tokenizes_differently_in_the_corrupted_prompt_has_no_partner():
    clean = segments("question question question last", [5, 6, 7, 4])
    corrupt = segments("question question question last", [5, 9, 7, 4])
    aligned = align(clean, corrupt)
    assert aligned.pairs == {0: 0, 2: 2, 3: 3}
    assert "no '6' at this place in its text" in aligned.reasons[1]


def test_the_store_says_which_positions_were_left_unpatched_and_why(tiny_llava, llava_sample, tmp_path):
    sample = llava_sample.with_(replacements={"visual": "the"})  # one token for two
    ds = vt.patch(
        tiny_llava,
        [sample],
        corruption=vt.ReplaceSpan("visual"),
        grid=vt.Grid(sites=("mlp",), segments=("visual", "last")),
        store=tmp_path / "trace.zarr",
        progress=False,
    )
    stored = vt.open_result(tmp_path / "trace.zarr")
    reasons = [str(r) for r in stored["unpaired"].values[0]]
    assert reasons == ["", "the replacement for span 'visual' has fewer tokens (1 of 2)", ""]
    assert np.isnan(ds["mlp"].values[0, :, :, 1]).all() and not np.isnan(ds["mlp"].values[0, :, :, 0]).any()
