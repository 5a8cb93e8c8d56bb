"""HF model classes vlmtrace refuses, each with the reason: an error from the config, before weights.

A class without an adapter fails at load time with the adapter fields to write
(`registry.adapter_for`): nobody has looked at it yet. The classes below have been looked at,
and something in their computation does not fit what the engine measures, so writing an adapter
would not be enough (unless you register an adapter of your own for the class, which then wins).
`vlmtrace.load` stops on them after reading the config, naming the reason:

    vt.load("google/gemma-3n-E4B-it")   # RefusedArchitectureError: ... four AltUp streams ...

`tests/model_classes.py` writes the table of every image-text-to-text class transformers ships
(supported, refused with these reasons, or untested) to `docs/model_classes.md`.
"""

from __future__ import annotations

from .adapter import UnknownArchitectureError

REFUSED: dict[str, str] = {
    "Gemma3nForConditionalGeneration": (
        "its decoder layers carry four AltUp streams of hidden states, [stream, row, position, "
        "hidden], and add per-layer token inputs; no site of the engine is one tensor per (row, "
        "position), so a patch of one stream would be reported as a patch of the layer"
    ),
    "DiffusionGemmaForBlockDiffusion": (
        "it generates by block diffusion (denoising a canvas of tokens conditioned on a prompt "
        "cache), not by predicting the next token: there is no P(answer | prompt) for the engine "
        "to score"
    ),
    "PI0ForConditionalGeneration": (
        "it is a vision-language-action model: an action expert predicts continuous robot actions "
        "by flow matching, and there are no answer tokens to score"
    ),
    "PI05ForConditionalGeneration": (
        "it is a vision-language-action model: an action expert predicts continuous robot actions "
        "by flow matching, and there are no answer tokens to score"
    ),
    "EvollaForProteinText2Text": (
        "it reads protein sequences (a SaProt encoder), not images; vlmtrace's corruptions are image "
        "corruptions"
    ),
    "VisionEncoderDecoderModel": (
        "it joins any image encoder to any text decoder named in its config, so its module paths "
        "and cross-attention keywords depend on that pair and no one adapter describes the class; "
        "describe your pair with an Adapter and register it (vlmtrace.models.registry.register) "
        "before loading"
    ),
}
"""HF class name -> why vlmtrace cannot trace it correctly."""


class RefusedArchitectureError(UnknownArchitectureError):
    """A model class vlmtrace has looked at and cannot trace correctly (`REFUSED` says why)."""


def refuse(name: str) -> None:
    """Raise `RefusedArchitectureError` for a refused class; return for any other."""
    if name in REFUSED:
        raise RefusedArchitectureError(
            f"vlmtrace does not trace {name}: {REFUSED[name]}. See docs/model_classes.md for the "
            "classes it supports."
        )
