"""Where things are inside a model, and how its inputs and tensors are shaped, described as data.

The engine never asks "is this a LLaVA?". It asks the model's `Adapter`: where are the layers
of the stack being traced, which module's output is "the MLP contribution" of a layer, which
module's *input* holds the concatenated heads, where do image embeddings appear, how does each
model input batch (padded with its sequence, concatenated, or stacked), who computes positions,
and how each hooked tensor holds rows and positions (its layout). A new HF architecture is
one adapter file of such values plus a few small functions, not an edit of the engine.

    adapter = adapter_for(hf_model)           # vlmtrace.models.registry: class name -> Adapter
    adapter.stacks["lm"].layers               # "model.language_model.layers"
    adapter.stacks["lm"].sites["mlp"]         # Hook("mlp", "output")
    adapter.inputs["pixel_values"]            # ROW: stacked, one entry per batch row

Paths are relative to the HF model (the object `from_pretrained` returns); layer-site paths
are relative to one layer (`""` is the layer itself).

Every declaration is checked: at load time against the modules and the config (`check_shape`:
each site is looked up in every layer, so a site that exists only in some layers is known to
exist only there), and at run time against the live tensors (`vlmtrace.engine.layouts`): a tensor
whose shape does not match its declared layout stops the sweep with an error that names the
hook and both shapes. Nothing is indexed on a guess.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import UserError

SITE_KINDS = ("resid_pre", "block", "attn", "mlp", "cross_attn", "attn_head", "cross_attn_head")
"""Every kind of site a stack may offer. `attn_head` / `cross_attn_head` are per-head slices of the
input of the attention output projection; `resid_pre` is the residual stream entering a layer (the
layer's input: at layer l + 1, whatever the model added after layer l's output, such as Qwen3-VL's
DeepStack features); the others are whole module outputs."""

LayoutName = Literal["row_position", "flat_rows", "image_tiles", "image_tokens"]
"""How a hooked tensor holds the batch (`vlmtrace.engine.layouts` checks and applies each):

- `row_position`: [row, position, hidden] (or [row, units, hidden] for a per-row image), the default;
- `flat_rows`: [row * position, hidden], rows and positions flattened (OPT's MLP);
- `image_tiles`: [tile, patch, hidden], each row owning `Adapter.image_units(row)` consecutive tiles
  (LLaVA-NeXT / OneVision projector, Idefics3 connector);
- `image_tokens`: [token, hidden], each row owning its image tokens, consecutively (Qwen-VL merger).
"""


@dataclass(frozen=True)
class Hook:
    """One place to read or write an activation: a module, which side of it, and its layout."""

    path: str
    """Module path, relative to the model (absolute hooks) or to one layer (layer sites)."""
    side: Literal["output", "input"] = "output"
    """`input` is the module's first positional input (used for heads: `o_proj`'s input)."""
    index: int | str | None = None
    """If the module returns a tuple (or a ModelOutput), which element carries the tensor."""
    layout: LayoutName = "row_position"
    """How the tensor holds rows and positions; checked against the live shape on every use."""


@dataclass(frozen=True)
class Input:
    """How one model input batches when rows of different samples share a forward.

    Processors return one row's inputs; the engine builds a batch of many rows from them. How
    is a property of the input, not of the engine: per-token inputs are left-padded with their
    sequence, flat inputs (Qwen's pre-flattened patches) are concatenated, per-row inputs stacked.
    """

    kind: Literal["token", "flat", "row"]
    sequence: Literal["prompt", "decoder"] = "prompt"
    """For `token` inputs: the sequence whose length they share."""
    pad: int | Literal["pad_token"] = 0
    """For `token` inputs: the padding value (`"pad_token"`: the tokenizer's pad id)."""
    pad_to_largest: bool = False
    """For `row` inputs: rows may differ in any dimension (tiles of images of other sizes,
    Pixtral's images of another aspect ratio) and are zero-padded at the end of each dimension
    to the largest row, as the family's processor pads a batch of them."""
    forced: int | None = None
    """For `token` inputs: the value at teacher-forced answer tokens appended to the prompt
    (whole-answer metrics); None repeats the prompt's last value. PaliGemma marks its answer
    suffix with token type 1, so the answer stays causal after a bidirectional prefix."""


def token(
    sequence: Literal["prompt", "decoder"] = "prompt",
    pad: int | Literal["pad_token"] = 0,
    *,
    forced: int | None = None,
) -> Input:
    """A per-token input, left-padded with its sequence."""
    return Input("token", sequence, pad, forced=forced)


IDS = token(pad="pad_token")
MASK = token()
FLAT = Input("flat")
ROW = Input("row")
ROW_PADDED = Input("row", pad_to_largest=True)

LLAVA_INPUTS: Mapping[str, Input] = {"input_ids": IDS, "attention_mask": MASK, "pixel_values": ROW}
"""The inputs of a LLaVA-1.5-style processor: token ids and mask, one image per row."""


@dataclass(frozen=True)
class Scores:
    """Where one layer's self-attention computes its scores `scale * q . k + mask`.

    AtP*'s QK fix (`vlmtrace.engine.qk_fix`) recomputes a softmax for patched queries and keys,
    so it needs the queries and keys exactly as they enter the product (after rotary position
    embeddings), the factor and the additive mask. Every use checks that the declared pieces
    reproduce the layer's attention pattern, so a wrong declaration stops with an error.
    """

    module: str
    """Path (relative to a layer) of the attention module that receives the mask keyword and
    holds the `scale` attribute (LLaVA "self_attn"; BLIP "attention.self")."""
    call: str = ""
    """A call inside `module`'s forward (nnsight's `.source`) that returns (queries, keys) as
    [row, head, position, head_dim] after rotary embeddings, e.g. "apply_rotary_pos_emb_0"."""
    query: str = ""
    """Without `call`: the child of `module` whose output is the queries, [row, position,
    heads * head_dim] (models without rotary embeddings: BLIP's "query")."""
    key: str = ""
    """Without `call`: the child of `module` whose output is the keys, as `query`."""
    scale: str | None = "scaling"
    """Attribute of `module` that multiplies q . k; None: head_dim ** -0.5."""
    mask: str = "attention_mask"
    """Keyword of `module` holding the additive mask (None passed: nothing masked but the
    future, for a causal stack)."""


ROTARY_SCORES = Scores(module="self_attn", call="apply_rotary_pos_emb_0")
"""Llama-style attention (transformers 5): rotary queries and keys, `self.scaling`."""


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
    touch them in execution order). A site whose module is missing from some layers
    (Mllama's cross-attention) exists only at the others: `Shape.site_layers` says where."""
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
    cross_attention: str | None = None
    """Path (relative to a layer) of the module that receives the cross-attention mask as
    its `cross_mask_keyword` keyword: cross-attention knockout (question -> image patches) edits it."""
    cross_mask_keyword: str = "encoder_attention_mask"
    cross_states_keyword: str = "encoder_hidden_states"
    """The keyword under which that module receives the states it cross-attends to (their count is
    the mask's key width): BLIP's `encoder_hidden_states`, Mllama's `cross_attention_states`,
    T5's `key_value_states`."""
    cross_sequence: str | None = None
    """What cross-attention keys are: "image" (patches) or "prompt" (BLIP's decoder reads the question)."""
    scores: Scores | None = None
    """How a layer's self-attention scores keys, for AtP*'s QK fix; None: not declared, and
    the fix refuses this stack."""
    cross_scores: Scores | None = None
    """The same for its cross-attention, whose keys are `cross_sequence`'s (BLIP's decoder
    reads the question encoder's output there)."""


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
    noise corruptions edit these, through their layouts."""
    image_in_sequence: bool
    """True when image tokens sit inside the prompt (early fusion, LLaVA); False when the
    image reaches the text only through cross-attention (BLIP, Mllama)."""
    encode: Callable[..., dict[str, torch.Tensor]]
    """`encode(processor, prompt, image, decoder_ids) -> one row of model inputs` (token inputs
    1D; per-row inputs without the batch dim; flat inputs as the processor returns them)."""
    forward: Callable[..., torch.Tensor]
    """`forward(model, **batch) -> logits [B, T, V]` of the sequence that predicts the answer."""
    inputs: Mapping[str, Input] = field(default_factory=lambda: dict(LLAVA_INPUTS))
    """How each input `encode` returns batches. An input not declared here is an error: the
    engine never guesses whether a tensor is per token, per image or per row."""
    positions: Literal["engine", "model"] = "engine"
    """Who makes position ids. "engine": the engine passes `position_ids` counted from the
    attention mask, so a left-padded row computes what it computes alone (1-D RoPE, learned
    positions). "model": the model computes its own (Qwen's 3-D M-RoPE from `image_grid_thw`),
    and the engine never overrides them; resuming from a KV cache is then refused."""
    image_units: Callable[[Mapping[str, torch.Tensor]], int] | None = None
    """For an `image_tiles` / `image_tokens` image hook: how many tiles or tokens one row's
    image yields, from that row's encoded inputs. Default for `image_tokens`: the row's count
    of image tokens in `input_ids`."""
    answer_sequence: Literal["prompt", "decoder"] = "prompt"
    """Where the answer is predicted: after the prompt (decoder-only LMs) or by the decoder."""
    keeps_last_logits: bool = False
    """The model takes `logits_to_keep=n` and then computes logits only for the last n
    positions: the answer positions, under left padding. Saves rows x positions x vocab."""
    image_token_config: str | None = None
    """Config path of the image token id, for models that place image tokens in the prompt."""
    image_encoder: Hook | None = None
    """The module that encodes pixels. With a `row_position` layout (one output row per batch
    row) it runs once per distinct image of a forward (`image_encoder_inputs`), and prefix reuse
    keeps its output; other layouts are not reused."""
    image_encoder_inputs: tuple[str, ...] = ("pixel_values",)
    """The per-row inputs that only a `row_position` `image_encoder` reads. A forward whose rows
    repeat images (a sweep's rows show the clean and the corrupted image over and over) passes
    the encoder these inputs for one row per distinct image and gives every row its image's
    encoding (`vlmtrace.engine.forward.ImageRows`): the same values, the vision tower's compute
    and internal activations once per image instead of once per row (its output is still
    copied to every row). Each must be declared `ROW`."""
    image_encoder_runs_first: bool = False
    """The forward encodes the image before it embeds the prompt's tokens (BLIP, BLIP-2,
    Mllama); False where the tokens are embedded first (LLaVA, PaliGemma). A trace touches
    modules in the order the model runs them, so noise on the token embeddings goes before or
    after the encoder's output as declared here (a wrong declaration stops the trace)."""
    resumes_from_cache: bool = True
    """The model's forward returns `past_key_values` and runs a suffix on them without its
    image inputs. False for models that keep the cache elsewhere or need pixels on every call
    (BLIP-2's `language_model_outputs`): prefix reuse then skips layers only."""
    language_model: str | None = None
    """The module that receives the merged input embeddings (image features placed among the
    token embeddings) as its `inputs_embeds` keyword. Prefix reuse keeps them and resumes a
    chunk at its first patched position even inside the image block; without it a chunk that
    patches an image position starts at 0."""
    prompt_template: str | None = None
    """The family's documented prompt, with `{image}` (the processor's image placeholder) and
    `{question}`, used when the processor has no chat template."""
    requires: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Config path -> the values this adapter describes, for an HF class that wraps several
    language models (BLIP-2 with OPT or Flan-T5: `{"text_config.model_type": ("t5",)}`). The
    registry picks the adapter from the config alone, before any weight is read; empty: any."""
    image_grid: Any = None
    """How one image becomes the grid of image tokens (`vlmtrace.models.image_grid.ImageGrid`): what
    object regions, head functions and inpainting masks map boxes onto. None: not declared, and a
    region on this family is an error that says so."""
    fixes: tuple[Callable[[torch.nn.Module], None], ...] = ()
    """Corrections of known upstream bugs, installed once when the model is wrapped (BLIP's
    cross-attention mask). Each is a function of the model that registers its own hooks."""
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
    site_layers: Mapping[str, Mapping[str, tuple[int, ...]]] = field(default_factory=dict)
    """Stack -> site -> the layers where the site exists (all layers for most models)."""
    layer_kinds: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Stack -> the class name of each layer (Mllama interleaves two kinds)."""
    cross_attention_layers: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    """Stack -> the layers that have its `Stack.cross_attention` module (Mllama: a few)."""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def layers_with(self, stack: str, site: str) -> tuple[int, ...]:
        """Layers of `stack` where `site` exists."""
        return self.site_layers.get(stack, {}).get(site, tuple(range(self.layers[stack])))


class UnknownArchitectureError(UserError):
    """Raised for a model class that no adapter describes."""


class AdapterMismatchError(UserError):
    """An adapter's declaration does not match the model or a live tensor."""


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


def _has_module(root: torch.nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def check_shape(adapter: Adapter, model: torch.nn.Module) -> Shape:
    """Read layer/head counts from the config and check them against the real modules.

    Adapters encode assumptions about a family; a checkpoint that breaks one (a renamed
    module, a config that disagrees with the weights) should fail here with both values,
    not later inside a trace. Every layer is inspected: a site may exist in some layers only,
    and `Shape.site_layers` records where; a site found in no layer is an error.
    """
    layers: dict[str, int] = {}
    heads: dict[str, int] = {}
    site_layers: dict[str, dict[str, tuple[int, ...]]] = {}
    layer_kinds: dict[str, tuple[str, ...]] = {}
    cross_attention_layers: dict[str, tuple[int, ...]] = {}
    for name, stack in adapter.stacks.items():
        module_list = module_at(model, stack.layers)
        expected = int(config_value(model.config, stack.layers_config))
        if len(module_list) != expected:
            raise AdapterMismatchError(
                f"{adapter.family} adapter: config {stack.layers_config}={expected} but "
                f"{stack.layers} holds {len(module_list)} layers."
            )
        layers[name] = expected
        heads[name] = int(config_value(model.config, stack.heads_config))
        site_layers[name] = {}
        for site, hook in stack.sites.items():
            where = tuple(i for i, layer in enumerate(module_list) if _has_module(layer, hook.path))
            if not where:
                module_at(module_list[0], hook.path)  # raises, naming the missing path
            site_layers[name][site] = where
        if not any(_has_module(layer, stack.attention) for layer in module_list):
            module_at(module_list[0], stack.attention)
        if stack.cross_attention is not None:
            where = tuple(
                i for i, layer in enumerate(module_list) if _has_module(layer, stack.cross_attention)
            )
            if not where:
                module_at(module_list[0], stack.cross_attention)  # raises, naming the missing path
            cross_attention_layers[name] = where
        layer_kinds[name] = tuple(type(layer).__name__ for layer in module_list)
    for hook in adapter.embeddings.values():
        module_at(model, hook.path)
    if adapter.image_encoder is not None:
        module_at(model, adapter.image_encoder.path)
    image_token_id = None
    if adapter.image_token_config is not None:
        image_token_id = int(config_value(model.config, adapter.image_token_config))
    return Shape(
        layers=layers,
        heads=heads,
        image_token_id=image_token_id,
        site_layers=site_layers,
        layer_kinds=layer_kinds,
        cross_attention_layers=cross_attention_layers,
    )
