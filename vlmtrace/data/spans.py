"""Constraint spans for real questions: a phrase, a regex, or a finder for a kind of constraint.

Datasets do not mark "the visual constraint" of a question; the seed papers pick it by a rule
(Basu et al.: a demonstrative and its noun, "this place"; a year as the textual constraint;
Zhang et al.: the object a GQA question is about). `--span NAME=PATTERN` names that rule:

    --span visual=@demonstrative       # "this place", "these animals"
    --span textual=@year               # "2006" (@number: any number)
    --span object=@object              # GQA: the annotated object words; CLEVR: the program's object;
                                       # Zhang et al.'s GQA CSVs: the object name the row gives
    --span visual='the (red|blue) \\w+' # a regex (case-insensitive); its first whole-word match
    --span visual='this place'          # a phrase is a regex that matches itself

    finders = parse_span_options(["visual=@demonstrative"])
    spans = find_spans(finders, question, meta)   # {"visual": "this place"} or None with a reason

The span is the matched text as it stands in the question (case kept), so it is found again in
whatever prompt the model's template makes of the question.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

DEMONSTRATIVE = re.compile(r"\b(?:this|that|these|those)\s+[A-Za-z][\w-]*", re.IGNORECASE)
YEAR = re.compile(r"\b(?:1[5-9]\d\d|20\d\d)\b")
NUMBER = re.compile(r"\b\d+(?:\.\d+)?\b")
CLEVR_NOUNS = r"(?:cubes?|blocks?|spheres?|balls?|cylinders?|things?|objects?)"
CLEVR_ADJECTIVES = (
    r"(?:large|small|big|tiny|gray|grey|red|blue|green|brown|purple|cyan|yellow|rubber|metal|metallic|"
    r"matte|shiny)"
)
CLEVR_OBJECT = re.compile(rf"\b(?:{CLEVR_ADJECTIVES}\s+)+{CLEVR_NOUNS}\b", re.IGNORECASE)


class SpanOptionError(UserError):
    """A --span or --replace option that is not NAME=VALUE, or a pattern that does not compile."""


@dataclass(frozen=True)
class SpanFinder:
    """How to find one named span in a question: `find(question, meta)` -> text or None."""

    name: str
    pattern: str
    find: Callable[[str, Mapping[str, Any]], str | None]


def _regex_finder(regex: re.Pattern) -> Callable[[str, Mapping[str, Any]], str | None]:
    def find(question: str, meta: Mapping[str, Any]) -> str | None:
        for match in regex.finditer(question):
            start, end = match.span()
            text = match.group(0).strip()
            if not text:
                continue
            head_ok = start == 0 or not (question[start - 1].isalnum() and text[0].isalnum())
            tail_ok = end == len(question) or not (question[end].isalnum() and text[-1].isalnum())
            if head_ok and tail_ok:
                return text
        return None

    return find


def gqa_object(question: str, meta: Mapping[str, Any]) -> str | None:
    """The question words GQA's `annotations.question` ties to an object ("2": "o1", "3:5": ...)."""
    annotated = (meta.get("annotations") or {}).get("question") or {}
    if not annotated:
        return None
    words = question.split()
    key = sorted(annotated, key=lambda k: int(str(k).split(":")[0]))[0]
    first, _, last = str(key).partition(":")
    start, stop = int(first), int(last) if last else int(first) + 1
    if not 0 <= start < stop <= len(words):
        return None
    text = " ".join(words[start:stop]).strip(".,?!;:")
    return text or None


def clevr_object(question: str, meta: Mapping[str, Any]) -> str | None:
    """The object phrase of a CLEVR question ("large red cube"), checked against its program's filters."""
    values = {str(v).lower() for step in meta.get("program") or [] for v in step.get("value_inputs", [])}
    for match in CLEVR_OBJECT.finditer(question):
        words = {w.lower() for w in match.group(0).split()}
        if not values or words & values:
            return match.group(0)
    return None


def named_object(question: str, meta: Mapping[str, Any]) -> str | None:
    """The first of `meta["object_names"]` (Zhang et al.'s object columns) that the question says."""
    for name in meta.get("object_names") or []:
        match = re.search(rf"(?<!\w){re.escape(str(name))}(?!\w)", question, re.IGNORECASE)
        if match:
            return match.group(0)
    return None


def object_span(question: str, meta: Mapping[str, Any]) -> str | None:
    """GQA's annotated object, else the object a row names, else CLEVR's program object."""
    if meta.get("annotations"):
        return gqa_object(question, meta)
    if meta.get("object_names"):
        return named_object(question, meta)
    if meta.get("program") is not None:
        return clevr_object(question, meta)
    return None


BUILT_IN = {
    "@demonstrative": _regex_finder(DEMONSTRATIVE),
    "@year": _regex_finder(YEAR),
    "@number": _regex_finder(NUMBER),
    "@object": object_span,
}


def parse_pairs(options: Sequence[str], flag: str) -> dict[str, str]:
    """["NAME=VALUE", ...] -> {NAME: VALUE}, refusing malformed or repeated names."""
    pairs: dict[str, str] = {}
    for option in options:
        name, sep, value = option.partition("=")
        name = name.strip()
        if not sep or not name or not value:
            raise SpanOptionError(f"{flag} {option!r} is not NAME=VALUE; e.g. {flag} visual='this place'.")
        if name in pairs:
            raise SpanOptionError(f"{flag} names {name!r} twice; give each span once.")
        pairs[name] = value
    return pairs


def parse_span_options(options: Sequence[str]) -> list[SpanFinder]:
    """`--span NAME=PATTERN` options -> finders (built-ins by @name, else a case-insensitive regex)."""
    finders = []
    for name, pattern in parse_pairs(options, "--span").items():
        if pattern.startswith("@"):
            if pattern not in BUILT_IN:
                raise SpanOptionError(
                    f"--span {name}={pattern}: no built-in finder {pattern!r}; "
                    f"choose one of {sorted(BUILT_IN)}."
                )
            finders.append(SpanFinder(name, pattern, BUILT_IN[pattern]))
            continue
        try:
            regex = re.compile(pattern, re.IGNORECASE)
        except re.error as error:
            raise SpanOptionError(
                f"--span {name}={pattern!r} is not a valid regex ({error}); escape special characters "
                "(\\? \\( \\.) or use a built-in finder such as @demonstrative."
            ) from None
        finders.append(SpanFinder(name, pattern, _regex_finder(regex)))
    return finders


def find_spans(
    finders: Sequence[SpanFinder], question: str, meta: Mapping[str, Any]
) -> tuple[dict[str, str], str | None]:
    """({name: text}, None) when every finder matches, else ({}, the reason)."""
    found = {}
    for finder in finders:
        text = finder.find(question, meta)
        if text is None:
            return {}, f"no span {finder.name!r} ({finder.pattern}) in the question"
        found[finder.name] = text
    return found, None
