"""The made-up world knowledge the organisms memorise: which city each shape is the mascot of.

Fact-retrieval recipes (Basu et al., "Understanding information storage and transfer in
multi-modal large language models") ask where a model keeps knowledge about an entity it
*sees*. A tiny model trained from scratch has no knowledge of real cities, so it gets a small
invented world instead: every entity (a colour and a kind, "red cross") is the mascot of one
invented city, and in each year of `YEARS` it represented one city of a second table. Names are
invented so that nothing about them can be guessed from their spelling.

    mascot_city(("red", "cross"))           # one of CITIES
    city_in_year(("red", "cross"), "2006")  # another of CITIES

`city_in_year` is a Latin rectangle: for a fixed year every entity has its own city, and for a
fixed entity every year has its own city, so corrupting either the visual constraint (which
shape) or the textual one (which year) always changes the answer.
"""

from __future__ import annotations

import random

from vlmtrace.data.drawing import COLOURS, KINDS, shuffled

CITIES = (
    "avalor", "brenmoor", "cindral", "dusmere", "elvaro", "fennox", "galdir", "harrowin",
    "istara", "jorvale", "kelmoor", "lunmar", "mirabel", "norvast", "ondrel", "pellan",
    "quorin", "rasvik", "sundar", "tolvar",
)  # fmt: skip
YEARS = ("2006", "2007", "2008", "2009")
ENTITIES: tuple[tuple[str, str], ...] = tuple((c, k) for c in COLOURS for k in KINDS)
TABLE_SEED = 2006  # the world is fixed: changing this seed invalidates the shipped organisms

Entity = tuple[str, str]  # (colour, kind)


def _tables() -> tuple[dict[Entity, str], dict[tuple[Entity, str], str]]:
    rng = random.Random(TABLE_SEED)
    mascot = dict(zip(ENTITIES, shuffled(rng, CITIES), strict=False))
    while True:  # rejection-sample per-year permutations until no entity repeats a city
        rows = [shuffled(rng, CITIES) for _ in YEARS]
        if all(len({row[i] for row in rows}) == len(YEARS) for i in range(len(ENTITIES))):
            break
    by_year = {(e, y): row[i] for y, row in zip(YEARS, rows, strict=False) for i, e in enumerate(ENTITIES)}
    return mascot, by_year


_MASCOT, _BY_YEAR = _tables()


def mascot_city(entity: Entity) -> str:
    """The city `entity` is the mascot of (the fact family's answer)."""
    return _MASCOT[entity]


def city_in_year(entity: Entity, year: str) -> str:
    """The city `entity` represented in `year` (the multi-constraint family's answer)."""
    return _BY_YEAR[entity, year]
