"""Load and save processors whose video half cannot be built on this machine.

Qwen-VL processors (`Qwen2VLProcessor`, ...) hold an image processor, a tokenizer *and* a video
processor, and every Qwen video processor needs torchvision, which does not install beside torch
2.13 on CPU. `AutoProcessor.from_pretrained` then fails on a model that will only ever see
images, and `save_pretrained` fails on a processor built without its video half. Tracing reads
images only, so here such a processor is built image-only: the same class, the same image
processor and tokenizer, `video_processor=None`. Everything that can load normally does.

    processor = load_processor("vlmtrace/models/zoo/shapes-qwen")   # AutoProcessor, or image-only
    processor = image_only(Qwen2VLProcessor, image_processor=images, tokenizer=words)
    save_processor(processor, "out/")                               # as save_pretrained writes it
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, ProcessorMixin
from transformers.utils import CHAT_TEMPLATE_FILE, PROCESSOR_NAME

VIDEO = "video_processor"


def image_only(
    cls: type[ProcessorMixin], *, image_processor: Any, tokenizer: Any, **kwargs: Any
) -> ProcessorMixin:
    """An instance of processor class `cls` without its video processor.

    The constructor checks every sub-processor's class, and None is not a video processor; that
    one check is skipped for the None argument only (any other argument is still checked).
    """
    if VIDEO not in cls.get_attributes():
        return cls(image_processor=image_processor, tokenizer=tokenizer, **kwargs)
    made = cls.__new__(cls)
    check = made.check_argument_for_proper_class
    made.check_argument_for_proper_class = lambda name, value: None if value is None else check(name, value)
    try:
        cls.__init__(
            made, image_processor=image_processor, tokenizer=tokenizer, video_processor=None, **kwargs
        )
    finally:
        del made.check_argument_for_proper_class
    return made


def load_processor(path: str | os.PathLike, *, revision: str | None = None) -> ProcessorMixin:
    """`AutoProcessor.from_pretrained(path)`, or the same processor image-only where its video
    processor cannot be loaded: saved image-only (`"video_processor": null`, as `save_processor`
    writes it) or needing torchvision, which is missing."""
    try:
        return AutoProcessor.from_pretrained(path, revision=revision)
    except (ImportError, OSError) as error:
        failed = error
    try:
        processor_dict, _ = ProcessorMixin.get_processor_dict(path, revision=revision)
    except OSError:
        raise failed from None
    cls = getattr(transformers, processor_dict.get("processor_class") or "", None)
    saved_image_only = VIDEO in processor_dict and processor_dict[VIDEO] is None
    needs_torchvision = isinstance(failed, ImportError) and "torchvision" in str(failed).lower()
    if cls is None or VIDEO not in cls.get_attributes() or not (saved_image_only or needs_torchvision):
        raise failed  # not a processor whose video half is what failed: the error stands
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    image_processor = AutoImageProcessor.from_pretrained(path, revision=revision)
    init_keys = set(cls.__init__.__code__.co_varnames) - {"self", "image_processor", "tokenizer", VIDEO}
    kwargs = {k: v for k, v in processor_dict.items() if k in init_keys}
    return image_only(cls, image_processor=image_processor, tokenizer=tokenizer, **kwargs)


def save_processor(processor: Any, out: str | os.PathLike) -> None:
    """`processor.save_pretrained(out)`; for an image-only processor, the same files it would write
    (tokenizer files, `processor_config.json` with `"video_processor": null`, chat template)."""
    if getattr(processor, VIDEO, "absent") is not None:
        processor.save_pretrained(out)
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    processor.tokenizer._set_processor_class(type(processor).__name__)
    processor.tokenizer.save_pretrained(out)
    if isinstance(processor.chat_template, str):
        (out / CHAT_TEMPLATE_FILE).write_text(processor.chat_template, encoding="utf-8")
    processor.to_json_file(out / PROCESSOR_NAME)
