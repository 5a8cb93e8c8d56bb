"""Locate, then edit: change a fact a VLM knows at the MLP layers a causal trace found.

Causal tracing says *where* a model retrieves a fact; the first use of that is memory editing:
change the fact there and nowhere else. ROME (Meng et al., 2022) and MEMIT (Meng et al., 2023)
edit the MLP output projections of GPTs, reading each fact's key over many contexts; Basu et
al.'s MultEdit edits the early MLP layer MultimodalCausalTrace found for a VLM's visual
constraint, from a single key. Both are here, for any decoder whose MLP output projection the
table in `parts` knows, and evaluated with the editing literature's probes:

    request = EditRequest(sample, "avalor", images=other_pictures, paraphrases=rephrasings)
    e = vt.edit(vlm, [request], layers="traced", preserve=ordinary, span="last",
                contexts=Contexts(images=8, paraphrases=4))          # method="memit"
    base = vt.edit(vlm, [request], layers="traced", method="multedit", span="visual")
    with e:
        ...                                                          # the edited model
    scores = evaluate(vlm, e, reliability=[...], image_generality=[...], image_locality=[...])

One concept per module:

parts.py        where an edit acts: the MLP output projection per layer, plain forwards, hooks
contexts.py     what an edit is computed over: request, other images, paraphrases, text prefixes
values.py       the value v*: one δ optimised over every context, with the KL term
updates.py      the closed forms: MEMIT's covariance least squares, MultEdit's ridge; the keys
methods.py      `vt.edit`: MEMIT over contexts and MultEdit, spread over the layers, with provenance
deltas.py       `Edit`: weight deltas applied only when asked, restored exactly, saved to zarr
layers.py       `layers="traced"`: the MLP trace and the layers of largest indirect effect
evaluation.py   `evaluate`: reliability, generality, locality, portability with intervals

The records the edit reads and the probes it is scored on are data (`vlmtrace.data.edit_case`:
`EditRequest`, `EditCase`); `vlmtrace.data.scene_edits` builds them on the synthetic scenes and
`vlmtrace.data.loaders.edit_records` reads VLKEB and MMEdit (E-VQA) files.
"""

from ...data.edit_case import EditCase, EditRequest, probes_of
from .contexts import SINGLE, Contexts
from .deltas import Edit
from .evaluation import POOLED, check_disjoint, evaluate, summary_line
from .layers import effect_at, trace_for_edit, traced_layers
from .methods import METHODS, edit
from .parts import PROJECTIONS, EditError, Parts
from .updates import KeyCovariance, key_covariance, least_squares_update, measure_key_covariance, ridge_update
from .values import ValueFit

__all__ = [
    "METHODS",
    "POOLED",
    "PROJECTIONS",
    "SINGLE",
    "Contexts",
    "Edit",
    "EditCase",
    "EditError",
    "EditRequest",
    "KeyCovariance",
    "Parts",
    "ValueFit",
    "check_disjoint",
    "edit",
    "effect_at",
    "evaluate",
    "key_covariance",
    "least_squares_update",
    "measure_key_covariance",
    "probes_of",
    "ridge_update",
    "summary_line",
    "trace_for_edit",
    "traced_layers",
]
