"""Spans are whole words, found by rule in real questions, and never silently widened or <unk>."""

from __future__ import annotations

import pytest
from PIL import Image

import vlmtrace as vt
from vlmtrace.data.spans import SpanOptionError, find_spans, parse_span_options
from vlmtrace.engine.positions import SpanNotFoundError, UnknownWordsError, find_segments, replace_first
from vlmtrace.prompts import build_prompt

PROMPT = "<image> which city did the red shape represent in year 2006 ?"


@pytest.fixture(scope="module")
def llava():
    return vt.load("shapes-llava")


def segments(vlm, prompt, spans):
    ids = vlm.adapter.encode(vlm.processor, prompt, Image.new("RGB", (32, 32)))["input_ids"].tolist()
    return find_segments(
        vlm.tokenizer, ids, spans=spans, image_token_id=vlm.shape.image_token_id, prompt=prompt
    )


def test_a_span_covers_exactly_its_words(llava):
    found = segments(llava, PROMPT, {"textual": "year 2006"})
    assert [found.tokens[i] for i in found.positions("textual")] == ["year", "2006"]


def test_a_span_inside_a_longer_word_is_not_found_there(llava):
    with pytest.raises(SpanNotFoundError, match="only inside a longer word"):
        segments(llava, PROMPT, {"x": "he"})


def test_a_single_letter_span_is_not_placed_on_year(llava):
    found = segments(llava, "<image> which city did a red shape represent in year 2006 ?", {"x": "a"})
    assert [found.tokens[i] for i in found.positions("x")] == ["a"]


def test_a_span_missing_from_the_prompt_says_so(llava):
    with pytest.raises(SpanNotFoundError, match="does not occur in the prompt"):
        segments(llava, PROMPT, {"x": "blue"})


def test_replace_first_replaces_whole_words_only():
    assert replace_first("the year of a cat", "a", "one") == "the year of one cat"


def test_a_word_level_tokenizer_names_unknown_words_in_a_span():
    from vlmtrace.models.build import word_tokenizer

    tokenizer = word_tokenizer(["what", "is", "?"])
    ids = tokenizer("what is this place ?").input_ids
    with pytest.raises(UnknownWordsError, match=r"\['this', 'place'\]"):
        find_segments(tokenizer, ids, spans={"visual": "this place"}, prompt="what is this place ?")


def test_organisms_never_produce_unk_for_real_text(llava):
    ids = llava.tokenizer("<image> What is this café in 東京 ?").input_ids
    assert llava.tokenizer.unk_token_id not in ids


def test_organisms_keep_every_known_word_id(llava):
    assert llava.tokenizer("<image> which city did the red shape represent in year 2006 ?").input_ids == [
        5,
        13,
        23,
        24,
        9,
        28,
        10,
        25,
        26,
        27,
        62,
        11,
    ]


def test_a_real_unicode_span_is_found_on_an_organism(llava):
    found = segments(llava, "<image> what is this café ?", {"visual": "this café"})
    assert "".join(found.tokens[i] for i in found.positions("visual")).count("caf") == 1


def test_demonstrative_finder_takes_this_and_its_noun():
    [finder] = parse_span_options(["visual=@demonstrative"])
    assert find_spans([finder], "What continent is this place in?", {})[0] == {"visual": "this place"}


def test_year_finder_takes_the_year():
    assert find_spans(parse_span_options(["textual=@year"]), "Who won in 2006 at 3?", {})[0] == {
        "textual": "2006"
    }


def test_gqa_object_finder_reads_the_question_annotation():
    meta = {"annotations": {"question": {"4": "o1"}}}  # 0-based word index, as GQA writes it
    assert find_spans(parse_span_options(["object=@object"]), "What color is the bus?", meta)[0] == {
        "object": "bus"
    }


def test_clevr_object_finder_follows_the_program_filters():
    meta = {"program": [{"function": "filter_color", "value_inputs": ["red"]}]}
    question = "Is the blue cube left of the red sphere?"
    assert find_spans(parse_span_options(["object=@object"]), question, meta)[0] == {"object": "red sphere"}


def test_a_regex_span_matches_whole_words_case_insensitively():
    spans, _ = find_spans(parse_span_options(["visual=the (red|blue) \\w+"]), "Is The red bus here?", {})
    assert spans == {"visual": "The red bus"}


def test_a_question_without_the_span_gives_a_reason():
    spans, reason = find_spans(parse_span_options(["visual=@demonstrative"]), "What color is the bus?", {})
    assert spans == {} and "no span 'visual'" in reason


def test_a_malformed_span_option_names_the_form():
    with pytest.raises(SpanOptionError, match="NAME=VALUE"):
        parse_span_options(["visual"])


def test_an_unknown_built_in_finder_lists_the_built_ins():
    with pytest.raises(SpanOptionError, match="@demonstrative"):
        parse_span_options(["visual=@subject"])


def test_the_organism_prompt_is_its_chat_template(llava):
    assert build_prompt(llava, "which city ?") == "<image> which city ?"


def test_a_prompt_template_overrides_the_chat_template(llava):
    assert (
        build_prompt(llava, "q ?", template="USER: {image}\n{question} ASSISTANT:")
        == "USER: <image>\nq ? ASSISTANT:"
    )


def test_a_template_without_the_image_is_refused_for_llava(llava):
    from vlmtrace.prompts import PromptTemplateError

    with pytest.raises(PromptTemplateError, match=r"\{image\}"):
        build_prompt(llava, "q ?", template="{question}")


def test_blip_reads_the_bare_question():
    assert build_prompt(vt.load("shapes-blip"), "what colour ?") == "what colour ?"
