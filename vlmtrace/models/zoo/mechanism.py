"""The high-level causal model of the planted task, and which component computes each variable.

A planted organism is only ground truth if its mechanism is written down before anyone traces
it. This is that record: a three-variable causal model of "<image> the cross is the mascot of
which city ?" (`vlmtrace.data.planted`) and its *assignment*, the one low-level component that
strict interchange-intervention training (`vlmtrace.models.zoo.siit`) made compute each
variable. It is shipped as `mechanism.json` next to the weights.

    kind   (text: the constraint's last token)         colour = colour of the shape of `kind`
    image  (pixels)                                     city   = mascot_city((colour, kind))
                                                        answer = city
    colour <- attention head (l_c, h_c) at the constraint's last token, reading the image
    city   <- MLP of layer l_m at the constraint's last token (the fact lookup)
    answer <- attention head (l_a, h_a) at the last position, moving the city there

Interchange semantics: running a base input with a variable set to its value on a source
input gives `Mechanism.interchange(base, source, variable)`; swapping the assigned
component's activation from the source run into the base run must give the same answer. Every
other component is *unassigned*: swapping it must leave the answer alone (strictness).

    m = Mechanism.from_json(path)            # or PLANTED[name].mechanism
    m.interchange(base, source, "colour")    # mascot_city((source colour, base kind))
    m.components(layers=6, heads=4)          # every (site, layer, head) of the language model
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtrace.data.mascots import ENTITIES, mascot_city
from vlmtrace.data.planted import SPAN, TEMPLATE
from vlmtrace.data.scenes import Question

VARIABLES = ("colour", "city", "answer")
"""The high-level model's intermediate variables, in causal order."""
SITES = ("attn_head", "mlp")
"""Component kinds: one attention head's output (the input of `o_proj`, per head) and the MLP output."""
POSITIONS = ("constraint", "last")
"""Where a component acts: the last token of the constraint span, or the last prompt position."""


@dataclass(frozen=True)
class Component:
    """One low-level component: a head or an MLP of one language-model layer."""

    site: str  # "attn_head" or "mlp"
    layer: int
    head: int | None = None  # attn_head only

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ValueError(f"component site {self.site!r}: expected one of {SITES}")
        if (self.site == "attn_head") != (self.head is not None):
            raise ValueError(f"{self.site} component: a head index exactly when the site is attn_head")

    @property
    def name(self) -> str:
        return f"L{self.layer}.H{self.head}" if self.site == "attn_head" else f"L{self.layer}.MLP"


@dataclass(frozen=True)
class Assigned:
    """A variable's component and the position where it computes it."""

    component: Component
    position: str  # one of POSITIONS

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"position {self.position!r}: expected one of {POSITIONS}")


@dataclass(frozen=True)
class Mechanism:
    """The high-level causal model and the component assigned to each of its variables."""

    assignment: Mapping[str, Assigned]

    def __post_init__(self) -> None:
        if set(self.assignment) != set(VARIABLES):
            raise ValueError(f"assign every variable {VARIABLES}; got {sorted(self.assignment)}")
        layers = [self.assignment[v].component.layer for v in VARIABLES]
        if layers != sorted(set(layers)):
            raise ValueError(f"variables {VARIABLES} must sit at increasing layers; got {layers}")

    # --- the high-level model ---------------------------------------------------------------
    @staticmethod
    def values(question: Question) -> dict[str, str]:
        """Every variable of the high-level model on one input (inputs `kind` and `image` too)."""
        kind = question.meta["kind"]
        colour = question.scene[question.meta["selected"]].colour
        city = mascot_city((colour, kind))
        return {"kind": kind, "colour": colour, "city": city, "answer": city}

    def interchange(self, base: Question, source: Question, variable: str) -> str:
        """The answer of the base input with `variable` set to its value on the source input."""
        b, s = self.values(base), self.values(source)
        if variable == "colour":
            return mascot_city((s["colour"], b["kind"]))
        if variable in ("city", "answer"):
            return s["city"]
        raise ValueError(f"unknown variable {variable!r}; expected one of {VARIABLES}")

    # --- the low-level side -----------------------------------------------------------------
    def planted(self) -> dict[Component, str]:
        """Assigned component -> the position where it acts."""
        return {a.component: a.position for a in self.assignment.values()}

    @staticmethod
    def components(*, layers: int, heads: int) -> list[Component]:
        """Every component of a language model with `layers` layers of `heads` heads, in order."""
        out = []
        for layer in range(layers):
            out += [Component("attn_head", layer, h) for h in range(heads)]
            out.append(Component("mlp", layer))
        return out

    # --- data -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "task": {
                "prompt": "<image> " + TEMPLATE,
                "span": SPAN,
                "answer": "one city (one token)",
            },
            "high_level_model": {
                "inputs": {
                    "kind": "the kind word, the last token of the constraint span",
                    "image": "a scene of two shapes with distinct kinds and colours",
                },
                "variables": {
                    "colour": "the colour of the shape of `kind` in the image",
                    "city": "mascot_city((colour, kind)), the fact table below",
                    "answer": "city, at the last position",
                },
                "interchange": {
                    "colour": "mascot_city((source colour, base kind))",
                    "city": "source city",
                    "answer": "source city",
                },
                "mascot_city": {f"{c} {k}": mascot_city((c, k)) for c, k in ENTITIES},
            },
            "assignment": {
                v: {
                    "site": a.component.site,
                    "layer": a.component.layer,
                    **({"head": a.component.head} if a.component.head is not None else {}),
                    "position": a.position,
                }
                for v, a in self.assignment.items()
            },
            "components": {
                "attn_head": "one head's output: its slice of the input of self_attn.o_proj",
                "mlp": "the output of the layer's mlp",
                "positions": {
                    "constraint": f"the last token of span {SPAN!r} (the kind word)",
                    "last": "the last prompt position, where the answer is read",
                },
                "unassigned": "every other (component, position); each must be causally inert",
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Mechanism:
        assignment = {
            v: Assigned(Component(a["site"], int(a["layer"]), a.get("head")), a["position"])
            for v, a in data["assignment"].items()
        }
        return cls(assignment=assignment)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> Mechanism:
        return cls.from_dict(json.loads(Path(path).read_text()))
