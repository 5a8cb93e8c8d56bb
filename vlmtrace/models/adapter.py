"""Where things are inside a model, described as data.

The engine never asks "is this a LLaVA?". It asks the model's `Adapter`: where are the layers
of the stack being traced, which module's output is "the MLP contribution" of a layer, which
module's *input* holds the concatenated heads, where do image embeddings appear. A new HF
architecture is supported by writing one `Adapter` value (plus how to encode a sample and
read the answer logits), not by editing `sweep.py`.

    adapter = adapter_for(hf_model)           # looks the class name up in ADAPTERS
    adapter.stacks["lm"].layers               # "model.language_model.layers"
    adapter.stacks["lm"].sites["mlp"]         # Hook("mlp", "output")

Paths are relative to the HF model (the object `from_pretrained` returns). A `{}` in a path
is replaced by nothing: layer paths are relative to one layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import UserError

SITE_KINDS = ("block", "attn", "mlp", "cross_attn", "attn_head", "cross_attn_head")
"""Every kind of site a stack may offer. `attn_head` / `cross_attn_head` are per-head slices of the
input of the attention output projection; the others are whole module outputs."""


@dataclass(frozen=True)
class Hook:
    """One place to read or write an activation: a module and which side of it."""

    path: str
    """Module path, relative to the model (absolute hooks) or to one layer (layer sites)."""
    side: Literal["output", "input"] = "output"
    """`input` is the module's first positional input (used for heads: `o_proj`'s input)."""
    index: int | None = None
    """If the module returns a tuple, which element carries the hidden state."""


@dataclass(frozen=True)
class Stack:
    """A stack of transformer layers over one token sequence.

    LLaVA has one (the language model over image + text tokens); BLIP has two (the question
    encoder over question tokens, cross-attending to the image, and the answer decoder over
    answer tokens, cross-attending to the question).
    """

    layers: str
    """Path of the `ModuleList` of layers."""
    sequence: Literal["prompt", "decoder"]
    """Which token sequence the stack runs over: the prompt, or the decoder's input tokens."""
    sites: Mapping[str, Hook]
    """Site kind -> hook, in the order the modules run inside one layer (the engine must
    touch them in execution order)."""
    attention: str
    """Path (relative to a layer) of the self-attention module whose `attention_mask`
    keyword attention knockout edits."""
    heads_config: str
    """Config path of the head count, e.g. `text_config.num_attention_heads`."""
    layers_config: str
    """Config path of the layer count, checked against the ModuleList at load time."""
    patterns: Mapping[str, Hook] = field(default_factory=dict)
    """Attention probabilities [batch, head, query, key] by kind ("self", "cross"), read
    with eager attention; NOTICE-style attention plots use them."""
    causal: bool = True
    """Whether self-attention is causal (decoders) or bidirectional (BLIP's question encoder);
    needed to build a knockout mask where the model passes none."""


@dataclass(frozen=True)
class Adapter:
    """Everything the engine needs to know about one architecture family."""

    family: str
    architectures: tuple[str, ...]
    """HF class names this adapter describes (`type(model).__name__`)."""
    stacks: Mapping[str, Stack]
    """Named layer stacks; the first is the default one to trace."""
    embeddings: Mapping[str, Hook]
    """`"tokens"` and `"image"` embedding hooks (absolute), in execution order. Gaussian
    noise corruptions edit these."""
    image_in_sequence: bool
    """True when image tokens sit inside the prompt (early fusion, LLaVA); False when the
    image reaches the text only through cross-attention (BLIP)."""
    encode: Callable[..., dict[str, torch.Tensor]]
    """`encode(processor, prompt, image, decoder_ids) -> one row of model inputs` (1D tensors,
    plus `pixel_values` [C, H, W] where there is an image)."""
    forward: Callable[..., torch.Tensor]
    """`forward(model, **batch) -> logits [B, T, V]` of the sequence that predicts the answer."""
    answer_sequence: Literal["prompt", "decoder"] = "prompt"
    """Where the answer is predicted: after the prompt (decoder-only LMs) or by the decoder."""
    keeps_last_logits: bool = False
    """The model takes `logits_to_keep=n` and then computes logits only for the last n
    positions: the answer positions, under left padding. Saves rows x positions x vocab."""
    image_token_config: str | None = None
    """Config path of the image token id, for models that place image tokens in the prompt."""
    image_encoder: str | None = None
    """Path of the module that encodes pixels (one output row per image). Its output depends
    on the image alone, so prefix reuse computes it once per distinct image."""
    notes: str = ""

    @property
    def default_stack(self) -> str:
        return next(iter(self.stacks))


@dataclass(frozen=True)
class Shape:
    """Counts read from a model's config and checked against its modules at load time."""

    layers: Mapping[str, int]
    heads: Mapping[str, int]
    image_token_id: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


ADAPTERS: dict[str, Adapter] = {}
"""Architecture class name -> adapter. Filled by the family modules on import."""


def register(adapter: Adapter) -> Adapter:
    """Make an adapter known to `adapter_for` (family modules call this at import)."""
    for name in adapter.architectures:
        ADAPTERS[name] = adapter
    return adapter


class UnknownArchitectureError(UserError):
    """Raised for a model class that no adapter describes."""


def adapter_for(model: torch.nn.Module | str) -> Adapter:
    """The adapter describing `model` (or an architecture class name), or an error that says
    how to write one."""
    from . import blip, llava, text  # noqa: F401  (importing registers the adapters)

    name = model if isinstance(model, str) else type(model).__name__
    if name in ADAPTERS:
        return ADAPTERS[name]
    fields = ", ".join(f.name for f in Adapter.__dataclass_fields__.values())
    raise UnknownArchitectureError(
        f"vlmtrace has no adapter for {name}. Known: {', '.join(sorted(ADAPTERS))}. "
        f"Describe it with vlmtrace.models.adapter.Adapter(...) (fields: {fields}; each Stack "
        "names its `layers` ModuleList path and site hooks: block, attn, mlp, cross_attn, head) "
        "and call vlmtrace.models.adapter.register(adapter) before loading."
    )


def config_value(config: Any, path: str) -> Any:
    """Read a dotted config path such as `text_config.num_attention_heads`."""
    value = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def module_at(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule at a dotted path, with an error naming the path that does not exist."""
    try:
        return model.get_submodule(path)
    except AttributeError as error:
        raise UnknownArchitectureError(
            f"{type(model).__name__} has no module at {path!r} ({error}); the adapter's paths do "
            "not match this model. Print the model to see its module names and fix the adapter."
        ) from None


def check_shape(adapter: Adapter, model: torch.nn.Module) -> Shape:
    """Read layer/head counts from the config and check them against the real modules.

    Adapters encode assumptions about a family; a checkpoint that breaks one (a renamed
    module, a config that disagrees with the weights) should fail here with both values,
    not later inside a trace.
    """
    layers: dict[str, int] = {}
    heads: dict[str, int] = {}
    for name, stack in adapter.stacks.items():
        module_list = module_at(model, stack.layers)
        expected = int(config_value(model.config, stack.layers_config))
        if len(module_list) != expected:
            raise UnknownArchitectureError(
                f"{adapter.family} adapter: config {stack.layers_config}={expected} but "
                f"{stack.layers} holds {len(module_list)} layers."
            )
        layers[name] = expected
        heads[name] = int(config_value(model.config, stack.heads_config))
        for hook in stack.sites.values():
            module_at(module_list[0], hook.path)
        module_at(module_list[0], stack.attention)
    for hook in adapter.embeddings.values():
        module_at(model, hook.path)
    image_token_id = None
    if adapter.image_token_config is not None:
        image_token_id = int(config_value(model.config, adapter.image_token_config))
    return Shape(layers=layers, heads=heads, image_token_id=image_token_id)
