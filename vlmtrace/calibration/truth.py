"""Which cells of a method's grid are planted, for one sample, from the organism's mechanism.

A method answers in its own units: a causal trace scores (site, window, layer, position)
cells, head patching (layer, head, position), a knockout (block of attention edges, window,
layer). The mechanism (`vlmtrace.models.zoo.mechanism`) names components and positions. Here
the two meet: a cell is *planted* when it patches (or cuts the input of) a planted component
where that component acts:

- `mlp`: the cell's window covers the city MLP's layer, at the constraint's last token;
- `attn`: it covers the layer of a planted head at that head's position (the colour head at
  the constraint's last token, the answer head at the last position);
- `attn_head`: the same, and the cell's head is the planted head;
- `block` (the residual stream): the cell lies on the route of the corrupted variable, which
  depends on the corruption. An image corruption changes the colour, which lives at the
  selected shape's image token below the colour head, then at the constraint's last token up
  to the answer head, then at the last position. A change of the kind word lives at the
  constraint's last token up to the answer head, then at the last position;
- knockout: the cut edges include a planted head's reading, image token of the selected
  shape -> constraint at the colour head's layer, constraint -> last at the answer head's.

Every cell also names the components it covers (`Component` keys: site, layer, position
index, head), which faithfulness ablates (`vlmtrace.calibration.faithfulness`).

    where = Where.of(sample, tokens_labels)        # named positions of one prompt
    planted_trace_cell(mechanism, where, site="mlp", layers=(2,), position=17, head=None)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vlmtrace.data.drawing import GRID
from vlmtrace.data.sample import Sample
from vlmtrace.models.zoo.mechanism import Mechanism

Key = tuple[str, int, int, int | None]
"""A low-level component at one position: (site "mlp" | "attn" | "attn_head", layer, position, head)."""

IMAGE_ROUTE = "image"
TEXT_ROUTE = "text"


@dataclass(frozen=True)
class Where:
    """Named sequence positions of one prompt (indices into the clean input)."""

    constraint: int  # the last token of the constraint span (the kind word)
    last: int
    segments: dict[str, tuple[int, ...]]  # segment label -> its positions
    selected_image: int  # the image token of the selected shape

    @classmethod
    def of(cls, sample: Sample, labels: Sequence[str], span: str = "visual") -> Where:
        """From a sample (its scene) and the segment label of every prompt position."""
        segments: dict[str, list[int]] = {}
        for i, label in enumerate(labels):
            segments.setdefault(str(label), []).append(i)
        for needed in ("image", span, "last"):
            if needed not in segments:
                raise ValueError(f"the prompt has no {needed!r} segment (it has {sorted(segments)})")
        image = segments["image"]
        if len(image) != GRID * GRID:
            raise ValueError(f"expected {GRID * GRID} image tokens, one per scene cell; got {len(image)}")
        shape = sample.meta["scene"][sample.meta["selected"]]
        row, column = shape["cell"]
        return cls(
            constraint=segments[span][-1],
            last=segments["last"][-1],
            segments={k: tuple(v) for k, v in segments.items()},
            selected_image=image[row * GRID + column],
        )

    def named(self, position: str) -> int:
        return self.constraint if position == "constraint" else self.last

    def label(self, position: int) -> str:
        """The segment a position belongs to ("image", "visual", "question", "last", ...)."""
        for name, positions in self.segments.items():
            if position in positions:
                return name
        raise ValueError(f"position {position} is in no segment")


def planted_keys(mechanism: Mechanism, where: Where) -> set[Key]:
    """The planted components at their positions, as keys of the `mlp` / `attn_head` spaces."""
    keys: set[Key] = set()
    for assigned in mechanism.assignment.values():
        c = assigned.component
        keys.add((c.site, c.layer, where.named(assigned.position), c.head))
    return keys


def route(mechanism: Mechanism, where: Where, kind: str, n_layers: int) -> set[tuple[int, int]]:
    """(layer, position) residual cells that carry the corrupted variable (see module docstring)."""
    colour = mechanism.assignment["colour"].component.layer
    answer = mechanism.assignment["answer"].component.layer
    cells = set()
    for layer in range(n_layers):
        if layer >= answer:
            cells.add((layer, where.last))
        elif layer >= colour or kind == TEXT_ROUTE:
            cells.add((layer, where.constraint))
        else:
            cells.add((layer, where.selected_image))
    return cells


def covered(site: str, layers: Sequence[int], positions: Sequence[int], head: int | None) -> list[Key]:
    """The components a patched cell covers: a block cell covers its attention and its MLP."""
    sites = ("attn", "mlp") if site == "block" else (site,)
    return [
        (s, layer, p, head if s == "attn_head" else None)
        for s in sites
        for layer in layers
        for p in positions
    ]


def is_planted_cell(
    mechanism: Mechanism,
    where: Where,
    *,
    site: str,
    layers: Sequence[int],
    positions: Sequence[int],
    head: int | None,
    route_kind: str,
    n_layers: int,
) -> bool:
    """Whether a patched cell touches the planted mechanism where it acts."""
    if site == "block":
        on_route = route(mechanism, where, route_kind, n_layers)
        return any((layer, p) in on_route for layer in layers for p in positions)
    planted = planted_keys(mechanism, where)
    if site == "attn":  # the whole attention output holds every head
        planted = {("attn", layer, p, None) for s, layer, p, _ in planted if s == "attn_head"}
    return any(key in planted for key in covered(site, layers, positions, head))


def planted_edges(mechanism: Mechanism, where: Where) -> set[tuple[int, int, int]]:
    """(layer, key position, query position) attention edges the planted heads read through."""
    colour = mechanism.assignment["colour"].component.layer
    answer = mechanism.assignment["answer"].component.layer
    return {(colour, where.selected_image, where.constraint), (answer, where.constraint, where.last)}


def is_planted_block(
    mechanism: Mechanism, where: Where, *, layers: Sequence[int], keys: Sequence[int], queries: Sequence[int]
) -> bool:
    """Whether knocking out keys -> queries at `layers` cuts a planted head's reading."""
    edges = planted_edges(mechanism, where)
    return any((layer, k, q) in edges for layer in layers for k in keys for q in queries)
