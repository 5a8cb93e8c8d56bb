"""The prompt a model was trained on, built around a dataset's bare question.

A dataset gives "What colour is the bus?"; LLaVA-1.5 was trained on
"USER: <image>\\nWhat colour is the bus? ASSISTANT:", Qwen2-VL on its chat markup with vision
tokens, BLIP on the bare question. Tracing a model on a prompt it never saw measures something
else, so samples read from files get the model's own prompt, chosen in this order:

1. an explicit template (`--prompt-template`, `template=`): a format string with `{question}`
   and, for models that read image tokens in the prompt, `{image}`;
2. the processor's chat template (`apply_chat_template`), with the image placed first in the
   user turn, as model cards show it, and the generation prompt added;
3. the family's documented prompt (`Adapter.prompt_template`);
4. the bare question, for models that read the image by cross-attention (BLIP).

    prompt = build_prompt(vlm, "What colour is the bus?")
    samples = for_model(vlm, samples)       # every sample's meta["question"] in the model's prompt

Spans stay words of the question: `vlmtrace.engine.positions` finds them (and `image`, `last`) in
whatever the template produced. A template that itself contains a span's words before the
question (a system prompt saying "a helpful assistant", a span "a") is refused, because the
span would be found there.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

from .data.sample import Sample
from .engine.positions import word_occurrences
from .errors import UserError
from .models.load import VLM


class PromptTemplateError(UserError):
    """A prompt template that cannot place the question (or the image) where the model needs it."""


def image_placeholder(vlm: VLM) -> str:
    """The text the processor expands into image tokens (`<image>`, `<|image_pad|>`...)."""
    for owner in (vlm.processor, vlm.tokenizer):
        token = getattr(owner, "image_token", None)
        if isinstance(token, str) and token:
            return token
    return "<image>"


def check_template(template: str, *, needs_image: bool) -> None:
    """Refuse a template without `{question}`, with unknown fields, or without `{image}` when needed."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except (ValueError, TypeError) as error:
        raise PromptTemplateError(
            f"prompt template {template!r} is not a format string ({error}); "
            "write literal braces as {{ }}."
        ) from None
    unknown = fields - {"question", "image"}
    if "question" not in fields or unknown:
        raise PromptTemplateError(
            f"a prompt template uses {{question}} (and {{image}} for the image placeholder) and no other "
            f"field; {template!r} uses {sorted(fields)}. "
            "Example: 'USER: {image}\\n{question} ASSISTANT:'."
        )
    if needs_image and "image" not in fields:
        raise PromptTemplateError(
            f"this model reads the image where the prompt places it, but {template!r} has no {{image}}; "
            "add it, e.g. 'USER: {image}\\n{question} ASSISTANT:'."
        )


def build_prompt(vlm: VLM, question: str, *, template: str | None = None) -> str:
    """`question` in the prompt `vlm` expects (see the module docstring for the order of choices)."""
    in_sequence = vlm.adapter.image_in_sequence
    image = image_placeholder(vlm)
    if template is not None:
        check_template(template, needs_image=in_sequence)
        return template.format(question=question, image=image)
    chat = getattr(vlm.processor, "chat_template", None)
    if chat:
        content = [{"type": "image"}] if in_sequence else []
        content.append({"type": "text", "text": question})
        prompt = vlm.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        if isinstance(prompt, list):  # some processors return one prompt per conversation
            prompt = prompt[0]
        if in_sequence and image not in prompt:
            raise PromptTemplateError(
                f"{vlm.name}'s chat template produced {prompt!r}, without the image placeholder {image!r}; "
                "pass a prompt template with {image} (--prompt-template)."
            )
        return prompt
    documented = getattr(vlm.adapter, "prompt_template", None)
    if documented:
        check_template(documented, needs_image=in_sequence)
        return documented.format(question=question, image=image)
    if not in_sequence:
        return question
    raise PromptTemplateError(
        f"{vlm.name} has no chat template and its family ({vlm.adapter.family}) documents no prompt; pass "
        "one with --prompt-template (Python: template=), e.g. 'USER: {image}\\n{question} ASSISTANT:'."
    )


def for_model(vlm: VLM, samples: Sequence[Sample], *, template: str | None = None) -> list[Sample]:
    """Samples whose prompt is their question (`meta["question"]`) in `vlm`'s prompt.

    Samples without `meta["question"]` (a table row's verbatim `prompt`, synthetic scenes) keep
    their prompt. Raises when the template puts a span's words before the question.
    """
    out = []
    for sample in samples:
        question = sample.meta.get("question")
        if question is None or sample.meta.get("verbatim_prompt"):
            out.append(sample)
            continue
        prompt = build_prompt(vlm, question, template=template)
        at = prompt.find(question)
        for name, text in sample.spans.items():
            found = word_occurrences(prompt, text)
            if found and at >= 0 and found[0] < at:
                raise PromptTemplateError(
                    f"span {name!r} = {text!r} of sample {sample.id!r} occurs in the prompt template before "
                    f"the question ({prompt!r}), where it would be found instead; choose a longer span or "
                    "another --prompt-template."
                )
        out.append(sample.with_(prompt=prompt))
    return out
