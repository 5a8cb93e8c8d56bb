"""AtP*'s two fixes (Kramár et al. 2024) against plain-torch references written here.

The references share no code with the engine: forward hooks on the unwrapped tiny LLaVA, one
unbatched row at a time, and the model's own attention for every recomputed softmax (queries
and keys replaced where `apply_rotary_pos_emb` returns them).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from transformers.models.llama import modeling_llama

import vlmtrace as vt
from vlmtrace.engine.attribution import METHODS, attribute
from vlmtrace.engine.qk_fix import QKFixError
from vlmtrace.engine.screening import effects
from vlmtrace.models.build import build_llava


@pytest.fixture(scope="module")
def sharp_llava(tokenizer) -> vt.VLM:
    """The tiny LLaVA with queries and keys 8x larger: its attention saturates, as trained
    models' does, so recomputing the softmax changes estimates by up to a fifth (at 1x, by 1e-5)."""
    model, processor = build_llava(tokenizer, layers=3, seed=1)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return vt.wrap(model, processor, name="sharp-llava")


class Reference:
    """Plain torch on one row of the tiny LLaVA's language model: capture, replace, differentiate."""

    def __init__(self, vlm, sample):
        self.model = vlm.model
        self.layers = vlm.model.model.language_model.layers
        self.answer = vlm.tokenizer.convert_tokens_to_ids(sample.answer)
        self.rows = {
            side: vlm.processor(text=sample.prompt, images=image, return_tensors="pt")
            for side, image in (("clean", sample.image), ("corrupt", sample.image_pair))
        }

    def score(self, side: str) -> torch.Tensor:
        """log P(answer) of one run, under whatever hooks are installed."""
        logits = self.model(**self.rows[side]).logits[0, -1]
        return torch.log_softmax(logits.float(), -1)[self.answer]

    @contextmanager
    def hooks(self, *pairs):
        """Install (module, hook) forward hooks for the duration."""
        handles = [module.register_forward_hook(hook) for module, hook in pairs]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def skipped(self, layer: int | None):
        """Layer `layer` passes the gradient straight from its output to its input (GradDrop);
        its forward is unchanged. None: no layer skipped."""
        if layer is None:
            yield
            return

        def hook(module, args, output):
            return args[0] + (output - args[0]).detach()

        with self.hooks((self.layers[layer], hook)):
            yield

    @contextmanager
    def rotary(self, layer: int, edit):
        """Call `edit(side, x)` on the rotary queries ("q") and keys ("k") of one layer's
        attention, [1, heads, positions, head_dim]; the attention then uses what it returns.

        Hooks on `q_proj` / `k_proj` rotate their output with the layer's own cos and sin
        (read from its `position_embeddings`), and rotate the edited value back.
        """
        attention = self.layers[layer].self_attn
        angles = {}

        def keep_angles(module, args, kwargs):
            angles["cos"], angles["sin"] = (x.unsqueeze(1) for x in kwargs["position_embeddings"])

        def rotated(side):
            def hook(module, args, output):
                heads = output.view(*output.shape[:2], -1, attention.head_dim).transpose(1, 2)
                cos, sin = angles["cos"], angles["sin"]
                new = edit(side, heads * cos + modeling_llama.rotate_half(heads) * sin)
                back = new * cos - modeling_llama.rotate_half(new) * sin  # the inverse rotation
                return back.transpose(1, 2).reshape(output.shape)

            return hook

        handles = [
            attention.register_forward_pre_hook(keep_angles, with_kwargs=True),
            attention.q_proj.register_forward_hook(rotated("q")),
            attention.k_proj.register_forward_hook(rotated("k")),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def site_module(reference: Reference, site: str, layer: int):
    return reference.layers[layer].mlp if site == "mlp" else reference.layers[layer].self_attn.o_proj


def keep(store: dict, name: str, site: str):
    """A hook that keeps the site's tensor: the MLP's output, or the o_proj's input (heads)."""

    def hook(module, args, output):
        store[name] = args[0] if site == "attn_head" else output

    return hook


def replace_at(values: torch.Tensor, position: int, columns: slice, site: str):
    """A hook that writes `values` into one position (and columns) of the site's tensor."""

    def hook(module, args, output):
        if site == "attn_head":
            x = args[0].clone()
            x[0, position, columns] = values
            return module.forward(x)
        out = output.clone()
        out[0, position, columns] = values
        return out

    return hook


def reference_qk_fix(
    vlm, sample, site: str, layer: int, head: int | None, skipped: int | None = None, positions=None
) -> np.ndarray:
    """AtP + the QK fix of every position's cell at (site, layer[, head]), image pair, denoising.

    AtP: the corrupted run's gradient at the site, times clean - corrupted. The fix, from the
    model itself: patch the cell exactly and read the next layer's rotary query and key there
    (q', k'); then run the corrupted input with only that query (then only that key) replaced
    by q' + eps (q' - q), and differentiate sum(G * pattern) in eps, where G is the corrupted
    run's gradient of the metric with respect to the next layer's pattern: f(1) - f(0) is the
    exact softmax's effect, f'(0) the linear one. `skipped`: the gradients (of the site and of
    the pattern) with that layer skipped in the backward pass; `positions`: only those.
    """
    ref = Reference(vlm, sample)
    module, attention = site_module(ref, site, layer), ref.layers[layer + 1].self_attn
    dim = vlm.model.config.text_config.hidden_size // vlm.model.config.text_config.num_attention_heads
    columns = slice(None) if head is None else slice(head * dim, (head + 1) * dim)
    seen, base = {}, {}
    with torch.no_grad(), ref.hooks((module, keep(seen, "clean", site))):
        ref.score("clean")

    def keep_pattern(module, args, output):
        base["pattern"] = output[1]

    def keep_rotary(side, x):
        base[side] = x.detach()
        return x

    with ref.hooks((module, keep(seen, "corrupt", site)), (attention, keep_pattern)):
        with ref.rotary(layer + 1, keep_rotary), ref.skipped(skipped):
            score = ref.score("corrupt")
    activation = seen["corrupt"]
    grad, pattern_grad = torch.autograd.grad(score, [activation, base["pattern"]], allow_unused=True)
    grad = torch.zeros_like(activation) if grad is None else grad  # its own layer skipped
    pattern_grad = torch.zeros_like(base["pattern"]) if pattern_grad is None else pattern_grad
    delta = (seen["clean"] - activation).detach()
    estimates = []
    for p in range(activation.shape[1]) if positions is None else positions:
        atp = float((grad[0, p, columns] * delta[0, p, columns]).sum())
        moved = {}
        with torch.no_grad(), ref.hooks((module, replace_at(seen["clean"][0, p, columns], p, columns, site))):
            with ref.rotary(layer + 1, keep_at(moved, p)):
                ref.score("corrupt")
        fix = sum(softmax_fix(ref, layer + 1, p, side, base, moved, pattern_grad) for side in ("q", "k"))
        estimates.append(atp + fix)
    return np.array(estimates)


def keep_at(store: dict, p: int):
    """A rotary edit that keeps the queries and keys at position p."""

    def edit(side, x):
        store[side] = x[:, :, p].detach()
        return x

    return edit


def softmax_fix(ref: Reference, layer: int, p: int, side: str, base: dict, moved: dict, weights) -> float:
    """f(1) - f(0) - f'(0), f(eps) = sum(weights * pattern) with the query (side "q") or key ("k")
    at p moved from `base` a fraction eps of the way to `moved`, keys (queries) unchanged."""
    eps = torch.zeros((), requires_grad=True)
    pattern = {}

    def move(which, x):
        if which != side:
            return x
        x = x.clone()
        x[:, :, p] = base[side][:, :, p] + eps * (moved[side] - base[side][:, :, p])
        return x

    def read(module, args, output):
        pattern["value"] = output[1]

    def weighed():
        with ref.hooks((ref.layers[layer].self_attn, read)), ref.rotary(layer, move):
            ref.score("corrupt")
        return (weights * pattern["value"]).sum()

    start = weighed()
    (linear,) = torch.autograd.grad(start, eps)
    with torch.no_grad():
        eps.fill_(1.0)
        exact = weighed() - start
    return float(exact) - float(linear)


def test_the_qk_fix_equals_a_plain_torch_reference(sharp_llava, llava_sample):
    """Layer 1's MLP and layer 0's head 1 at every third position and the last: the attribution
    estimate plus, at the next layer, the exact softmax's effect of the patched query and key
    minus their linear effect, the queries and keys being those that patching that one position
    gives (the engine patches every position at once)."""
    kwargs = dict(
        corruption=vt.ImagePair(),
        grid=vt.Grid(sites=("mlp", "attn_head"), windows=(1,)),
        metric=vt.LogProb(),
        progress=False,
    )
    fixed = attribute(sharp_llava, [llava_sample], method="atp+qk", **kwargs)
    plain = attribute(sharp_llava, [llava_sample], method="atp", **kwargs)
    for site, layer, head in (("mlp", 1, None), ("attn_head", 0, 1)):
        cells = effects(fixed, site).isel(sample=0, window=0).sel(layer=layer)
        before = effects(plain, site).isel(sample=0, window=0).sel(layer=layer)
        if head is not None:
            cells, before = cells.sel(head=head), before.sel(head=head)
        positions = sorted({*range(0, cells.sizes["position"], 3), cells.sizes["position"] - 1})
        engine = cells.values[positions]
        assert np.abs(engine - before.values[positions]).max() > 5e-5  # 50x the tolerance below
        reference = reference_qk_fix(sharp_llava, llava_sample, site, layer, head, positions=positions)
        np.testing.assert_allclose(engine, reference, rtol=1e-4, atol=1e-6)


def test_the_qk_fix_leaves_the_last_layer_to_attribution(tiny_llava, llava_sample):
    """No attention follows the last layer: its cells are plain attribution patching."""
    kwargs = dict(
        corruption=vt.ImagePair(),
        grid=vt.Grid(sites=("mlp", "attn_head"), layers=(2,)),
        metric=vt.LogProb(),
        progress=False,
    )
    fixed = attribute(tiny_llava, [llava_sample], method="atp+qk", **kwargs)
    plain = attribute(tiny_llava, [llava_sample], method="atp", **kwargs)
    for site in ("mlp", "attn_head"):
        np.testing.assert_array_equal(fixed[site].values, plain[site].values)


def graddrop(per_copy: list[np.ndarray]) -> np.ndarray:
    """Kramár et al.'s eq. 11 from the plain estimate and one per skipped layer, signed as the plain one."""
    return np.sign(per_copy[0]) * sum(np.abs(x) for x in per_copy[1:]) / (len(per_copy) - 2)


def reference_attribution(vlm, sample, skipped: int | None) -> np.ndarray:
    """AtP of every MLP cell [layer, position], image pair, denoising, with `skipped` skipped."""
    ref = Reference(vlm, sample)
    mlps = [layer.mlp for layer in ref.layers]
    clean, corrupt = {}, {}
    with torch.no_grad(), ref.hooks(*[(m, keep(clean, i, "mlp")) for i, m in enumerate(mlps)]):
        ref.score("clean")
    with ref.hooks(*[(m, keep(corrupt, i, "mlp")) for i, m in enumerate(mlps)]), ref.skipped(skipped):
        score = ref.score("corrupt")
    # the skipped layer's own MLP is cut off from the metric: no gradient reaches it
    grads = torch.autograd.grad(score, [corrupt[i] for i in range(len(mlps))], allow_unused=True)
    grads = [torch.zeros_like(corrupt[i]) if g is None else g for i, g in enumerate(grads)]
    return np.stack(
        [(g[0] * (clean[i] - corrupt[i]).detach()[0]).sum(-1).numpy() for i, g in enumerate(grads)]
    )


def test_graddrop_equals_a_plain_torch_reference(tiny_llava, llava_sample):
    """Every MLP cell: |AtP| with each layer in turn passing its gradient straight through
    (explicit detach hooks), summed and divided by L - 1, signed as plain AtP."""
    estimates = attribute(
        tiny_llava,
        [llava_sample],
        corruption=vt.ImagePair(),
        grid=vt.Grid(sites=("mlp",), windows=(1,)),
        metric=vt.LogProb(),
        method="atp+graddrop",
        progress=False,
    )
    engine = effects(estimates, "mlp").isel(sample=0, window=0).values
    n_layers = len(tiny_llava.model.model.language_model.layers)
    per_copy = [reference_attribution(tiny_llava, llava_sample, skip) for skip in [None, *range(n_layers)]]
    assert not np.allclose(per_copy[1], per_copy[0])  # skipping layer 0 changes something
    np.testing.assert_allclose(engine, graddrop(per_copy), rtol=1e-4, atol=1e-7)


def test_atp_star_combines_both_fixes_as_a_plain_torch_reference_does(sharp_llava, llava_sample):
    """Layer 0's MLP at the question's positions: GradDrop over QK-fixed estimates, each copy's
    fix weighed by that copy's gradient of the pattern."""
    kwargs = dict(
        corruption=vt.ImagePair(),
        grid=vt.Grid(sites=("mlp",), windows=(1,), layers=(0,)),
        metric=vt.LogProb(),
        progress=False,
    )
    estimates = attribute(sharp_llava, [llava_sample], method="atp*", **kwargs)
    without = attribute(sharp_llava, [llava_sample], method="atp+graddrop", **kwargs)
    engine = effects(estimates, "mlp").isel(sample=0, window=0).sel(layer=0).values
    positions = list(range(len(engine) - 5, len(engine)))
    assert np.abs(engine - effects(without, "mlp").isel(sample=0, window=0).sel(layer=0).values).max() > 5e-5
    n_layers = len(sharp_llava.model.model.language_model.layers)
    per_copy = [
        reference_qk_fix(sharp_llava, llava_sample, "mlp", 0, None, skipped=skip, positions=positions)
        for skip in [None, *range(n_layers)]
    ]
    np.testing.assert_allclose(engine[positions], graddrop(per_copy), rtol=1e-4, atol=1e-7)


def test_every_method_is_named_and_an_undeclared_stack_refuses_the_qk_fix(tiny_llava, llava_sample):
    assert METHODS == ("atp", "ig", "atp+qk", "atp+graddrop", "atp*")
    from dataclasses import replace

    stack = tiny_llava.adapter.stacks["lm"]
    undeclared = replace(tiny_llava.adapter, stacks={"lm": replace(stack, scores=None)})
    vlm = replace(tiny_llava, adapter=undeclared)
    with pytest.raises(QKFixError, match="Stack.scores"):
        attribute(vlm, [llava_sample], corruption=vt.ImagePair(), method="atp*", progress=False)


def test_options_accept_every_estimator_and_name_them_for_a_bad_one():
    assert vt.Options(screen_method="atp*").screen_method == "atp*"
    with pytest.raises(vt.UserError, match="atp\\+graddrop"):
        vt.Options(screen_method="atp**")


def reference_blip_key_fix(vlm, sample) -> tuple[np.ndarray, float]:
    """AtP + the QK fix of every block cell of BLIP's last encoder layer, image pair, denoising,
    and the clean log P(answer): the answer decoder's cross-attention keys are what that layer's
    output meets first, in every decoder layer. Plain hooks on the unwrapped model: the key at
    the patched position moved by eps towards its patched value, one decoder layer at a time."""
    model = vlm.model
    last = model.text_encoder.encoder.layer[-1]
    crosses = [layer.crossattention.self for layer in model.text_decoder.bert.encoder.layer]
    answer = vlm.tokenizer.convert_tokens_to_ids(sample.answer)

    def batch(image):
        row = vlm.adapter.encode(vlm.processor, sample.prompt, image, [answer])
        return {name: value[None] for name, value in row.items()}

    rows = {"clean": batch(sample.image), "corrupt": batch(sample.image_pair)}

    def score(side):
        return torch.log_softmax(vlm.adapter.forward(model, **rows[side])[0, 0].float(), -1)[answer]

    def hooked(*pairs):
        return Reference.hooks(None, *pairs)

    seen, patterns, keys = {}, {}, {}

    def keeper(store, name, index=None):
        def hook(module, args, output):
            store[name] = output if index is None else output[index]

        return hook

    with torch.no_grad(), hooked((last, keeper(seen, "clean"))):
        clean = float(score("clean"))
    with hooked(
        (last, keeper(seen, "corrupt")),
        *[(cross, keeper(patterns, j, 1)) for j, cross in enumerate(crosses)],
        *[(cross.key, keeper(keys, j)) for j, cross in enumerate(crosses)],
    ):
        base = score("corrupt")
    grads = torch.autograd.grad(base, [seen["corrupt"], *patterns.values()])
    grad, weights = grads[0], grads[1:]
    delta = (seen["clean"] - seen["corrupt"]).detach()
    estimates = []
    for p in range(delta.shape[1]):
        moved = {}

        def patch(module, args, output, p=p):
            out = output.clone()
            out[0, p] = seen["clean"][0, p]
            return out

        with (
            torch.no_grad(),
            hooked((last, patch), *[(c.key, keeper(moved, j)) for j, c in enumerate(crosses)]),
        ):
            score("corrupt")
        fix = 0.0
        for j, cross in enumerate(crosses):
            eps = torch.zeros((), requires_grad=True)
            pattern = {}

            def move(module, args, output, p=p, j=j, eps=eps, moved=moved):
                out = output.clone()
                out[0, p] = keys[j][0, p].detach() + eps * (moved[j][0, p] - keys[j][0, p].detach())
                return out

            def weighed(cross=cross, move=move, pattern=pattern, j=j):
                with hooked((cross.key, move), (cross, keeper(pattern, "value", 1))):
                    score("corrupt")
                return (weights[j] * pattern["value"]).sum()

            start = weighed()
            (linear,) = torch.autograd.grad(start, eps)
            with torch.no_grad():
                eps.fill_(1.0)
                fix += float(weighed() - start) - float(linear)
        estimates.append(float((grad[0, p] * delta[0, p]).sum()) + fix)
    return np.array(estimates), clean


def test_the_qk_fix_meets_the_answer_decoders_cross_attention_after_the_last_encoder_layer(
    tiny_blip, blip_sample
):
    """BLIP's question encoder: a patch of its last layer reaches the answer through the
    decoder's cross-attention keys; the fix recomputes those softmaxes, as the reference does."""
    kwargs = dict(
        corruption=vt.ImagePair(), grid=vt.Grid(sites=("block",)), metric=vt.LogProb(), progress=False
    )
    fixed = attribute(tiny_blip, [blip_sample], method="atp+qk", **kwargs)
    plain = attribute(tiny_blip, [blip_sample], method="atp", **kwargs)
    last = tiny_blip.shape.layers["encoder"] - 1
    engine = effects(fixed, "block").isel(sample=0, window=0).sel(layer=last).values
    reference, clean = reference_blip_key_fix(tiny_blip, blip_sample)
    assert float(fixed["clean"].squeeze()) == pytest.approx(clean, abs=1e-5)  # the same metric
    assert (
        np.abs(engine - effects(plain, "block").isel(sample=0, window=0).sel(layer=last).values).max() > 1e-4
    )
    np.testing.assert_allclose(engine, reference, rtol=1e-4, atol=1e-6)
