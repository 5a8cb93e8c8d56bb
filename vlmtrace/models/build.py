"""Build small VLMs from configs, with a word-level tokenizer and a real HF processor.

No machine here reaches a model hub, so everything vlmtrace tests or ships is built locally:
random-weight tiny models that exercise the mechanics, and the trained organisms of
`vlmtrace.models.zoo`. Both are genuine `transformers` classes (`LlavaForConditionalGeneration`,
`BlipForQuestionAnswering`) with genuine processors, saved and loaded with `save_pretrained` /
`from_pretrained`, so the code paths a user takes with `llava-hf/llava-1.5-7b-hf` are the ones
tested here.

    tokenizer = word_tokenizer(["what", "colour", "is", "this", "shape", "?", "red"])
    model, processor = build_llava(tokenizer, layers=4, seed=0)

The sizes follow `../shared/NOTES.md` (a 2-layer CLIP tower with 8-pixel patches over 32x32
images gives 16 image tokens; `vision_feature_layer=-1` because -2 of a 2-layer tower is the
first layer's output).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BlipConfig,
    BlipForQuestionAnswering,
    BlipImageProcessorPil,
    BlipProcessor,
    BlipTextConfig,
    BlipVisionConfig,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

IMAGE_TOKEN = "<image>"
# Special tokens every organism tokenizer carries, in this order (ids 0..5).
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "[SEP]", IMAGE_TOKEN]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer over a fixed vocabulary.

    One token per word keeps organism prompts legible in plots ("this", "shape") and makes
    token counts of phrases obvious, which symmetric token replacement relies on.
    """
    vocab: dict[str, int] = {}
    for word in [*SPECIAL_TOKENS, *words]:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(IMAGE_TOKEN, behavior="isolated")]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        sep_token="[SEP]",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
"""Byte tokens appended after the words by `add_byte_fallback`, in byte order."""


def byte_fallback_tokenizer(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The same word-level vocabulary, ids unchanged, plus 256 byte tokens for everything else.

    A known word (the pre-tokenizer splits on whitespace and punctuation) is one token with its
    old id; any other word is spelled in UTF-8 bytes (`<0x57>` ...), so the tokenizer never
    produces `<unk>`: an organism trained on 60 words reads real questions end to end (what it
    makes of them is meaningless). Byte tokens decode back to the text (`ByteFallback`).
    """
    vocab = dict(tokenizer.get_vocab())
    specials = {t: vocab[t] for t in SPECIAL_TOKENS if t in vocab}
    words = {t: i for t, i in vocab.items() if t not in specials}
    for token in BYTE_TOKENS:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(
        models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, ignore_merges=True)
    )
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(IMAGE_TOKEN, behavior="isolated"),
            pre_tokenizers.Punctuation("isolated"),
        ]
    )
    core.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    extended = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        sep_token="[SEP]",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side=tokenizer.padding_side,
    )
    extended.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    moved = {w: extended.convert_tokens_to_ids(w) for w in [*specials, *words]}
    changed = {w: (vocab[w], i) for w, i in moved.items() if i != vocab[w]}
    if changed:
        raise RuntimeError(f"byte fallback moved token ids {changed}; the weights would no longer match.")
    return extended


def add_byte_fallback(model: torch.nn.Module, processor, *, seed: int = 0) -> None:
    """Give a trained organism `byte_fallback_tokenizer` and grow its vocabulary to match, in place.

    Every parameter with one entry per token gains 256. Input rows (embeddings) are seeded
    normal draws with the trained rows' std, so different bytes read differently. A head with a bias
    (BLIP's answer decoder, tied to its embeddings) gets a bias of -1e4 for them: their
    probability is exactly zero and every known token's probability is bit-identical. A head
    without a bias (LLaVA's `lm_head`) gets zero rows, a logit of 0, far below a trained
    answer's (>= 9 on held-out questions): accuracies are unchanged, but each probability is
    divided by 1 + 256 exp(-logsumexp) (shipped organism: at most 0.014 lower). Known words keep
    their ids and rows, so prompts of known words compute bit-identical hidden states and logits.
    """
    tokenizer = processor.tokenizer
    old = len(tokenizer)
    extended = byte_fallback_tokenizer(tokenizer)
    extra = len(extended) - old
    generator = torch.Generator().manual_seed(seed)
    grown: dict[int, torch.nn.Parameter] = {}  # id(old parameter) -> its grown copy (keeps ties)

    def grow(parameter: torch.nn.Parameter, rows: torch.Tensor) -> torch.nn.Parameter:
        if id(parameter) not in grown:
            grown[id(parameter)] = torch.nn.Parameter(torch.cat([parameter.data, rows.to(parameter)]))
        return grown[id(parameter)]

    with torch.no_grad():
        modules = list(model.modules())
        for module in modules:  # embeddings first, so a tied head reuses their grown rows
            if isinstance(module, torch.nn.Embedding) and module.num_embeddings == old:
                rows = torch.randn(extra, module.embedding_dim, generator=generator)
                module.weight = grow(module.weight, rows * module.weight.std() + module.weight.mean())
                module.num_embeddings = old + extra
        for module in modules:
            if isinstance(module, torch.nn.Linear) and module.out_features == old:
                module.weight = grow(module.weight, torch.zeros(extra, module.in_features))
                module.out_features = old + extra
            for name, parameter in list(module.named_parameters(recurse=False)):
                if parameter.ndim == 1 and parameter.shape[0] == old:  # output biases
                    setattr(module, name, grow(parameter, torch.full((extra,), -1e4)))
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and getattr(config, "vocab_size", None) == old:
            config.vocab_size = old + extra
    processor.tokenizer = extended


def organism_chat_template(architecture: str) -> str | None:
    """The prompt an organism was trained on, as a chat template: "<image> question" (LLaVA, Qwen).

    BLIP reads the bare question (the image enters by cross-attention) and needs none.
    """
    if architecture not in ("llava", "qwen"):
        return None
    return (
        "{% for message in messages %}{% for content in message['content'] %}"
        "{% if content['type'] == 'image' %}" + IMAGE_TOKEN + " {% elif content['type'] == 'text' %}"
        "{{ content['text'] }}{% endif %}{% endfor %}{% endfor %}"
    )


def random_model(
    cls: type[torch.nn.Module],
    config,
    *,
    seed: int,
    attn_implementation: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
):
    """`cls(config)` in eval mode with weights drawn from `seed`: every builder's model, so the
    same seed gives the same weights. With `device` or `dtype`, the weights are made there."""
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    if device is None and dtype is None:
        return cls(config).eval()
    with torch.device(device or "cpu"):
        return cls._from_config(config, dtype=dtype).eval()


def build_llava(
    tokenizer: PreTrainedTokenizerFast,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_layers: int = 2,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    seed: int = 0,
    attn_implementation: str = "eager",
    mlp: int | None = None,
    vision_hidden: int | None = None,
    vision_heads: int | None = None,
    vision_mlp: int | None = None,
    vision_feature_layer: int = -1,
    max_positions: int = 256,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A LLaVA (CLIP tower, MLP projector, Llama decoder) with random weights drawn from `seed`.

    Sizes default to the tiny test shape (MLP 4 d, CLIP as wide as the decoder); the rest are
    for full shapes (`benchmarks/gpu_ready.py`'s LLaVA-1.5-7B: MLP 11008, CLIP-L, the layer
    before the last). With `device` or `dtype`, the weights are made there directly: a 7B
    model never exists in float32 on the host.
    """
    vision_hidden = vision_hidden or hidden
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_mlp or 2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads or heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=mlp or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config.image_token_index = config.image_token_id
    model = random_model(
        LlavaForConditionalGeneration,
        config,
        seed=seed,
        attn_implementation=attn_implementation,
        device=device,
        dtype=dtype,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )
    return model, processor


def build_blip(
    tokenizer: PreTrainedTokenizerFast,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_layers: int = 2,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    attn_implementation: str = "eager",
) -> tuple[BlipForQuestionAnswering, BlipProcessor]:
    """A BLIP VQA model (ViT, question encoder with cross-attention, answer decoder)."""
    text = BlipTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        encoder_hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        sep_token_id=tokenizer.sep_token_id,
    )
    vision = BlipVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        initializer_range=0.02,  # BLIP's default of 1e-10 gives a constant vision tower
    )
    config = BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())
    config.text_config.bos_token_id = tokenizer.bos_token_id
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config.decoder_start_token_id = tokenizer.bos_token_id
    model = random_model(BlipForQuestionAnswering, config, seed=seed, attn_implementation=attn_implementation)
    image_processor = BlipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


def build_llava_next(
    tokenizer: PreTrainedTokenizerFast,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 64,
    layers: int = 3,
    heads: int = 4,
    seed: int = 0,
    attn_implementation: str = "eager",
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A LLaVA-NeXT (any-resolution tiles) with random weights: a base view plus tiles, so the
    number of image tokens depends on the image, as in the real family."""
    pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
    vision = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = random_model(
        LlavaNextForConditionalGeneration, config, seed=seed, attn_implementation=attn_implementation
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )
    return model, processor
