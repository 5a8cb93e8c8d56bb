"""Load a VLM by HF repo id, local directory or organism name, ready for interventions.

    vlm = load("llava-hf/llava-1.5-7b-hf", device="cuda", dtype="float16")
    vlm = load("shapes-llava")                  # a trained organism shipped with vlmtrace
    vlm = wrap(model, processor, name="tiny")   # a model already in memory

The architecture is looked up, by class and config, *before* the weights are read, so an
unsupported model fails in a second with a message naming the reason or the adapter fields to
write, not after a 14 GB download.
Attention defaults to the eager implementation: attention knockout edits the additive mask
and NOTICE-style attention patterns need the probabilities, which fused kernels do not give.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from nnsight import NNsight

from ..errors import UserError
from .adapter import Adapter, Shape, UnknownArchitectureError, check_shape
from .processor import load_processor
from .registry import adapter_for


@dataclass
class VLM:
    """A loaded model with its processor, its adapter and its nnsight wrapper."""

    model: torch.nn.Module
    """The Hugging Face model (eval mode)."""
    processor: Any
    """The HF processor (or tokenizer, for text-only models)."""
    adapter: Adapter
    shape: Shape
    """Layer and head counts per stack, checked against the modules at load time."""
    envoy: NNsight
    """The nnsight wrapper every trace runs through."""
    name: str
    """What the model was loaded from: repo id, directory or organism name (provenance)."""
    revision: str | None = None

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        layers = ", ".join(f"{k}: {v} layers" for k, v in self.shape.layers.items())
        return f"VLM({self.name!r}, {self.adapter.family}, {layers})"


def wrap(model: torch.nn.Module, processor: Any, *, name: str, revision: str | None = None) -> VLM:
    """Wrap an in-memory HF model and its processor (for models built or edited in Python)."""
    adapter = adapter_for(model)
    shape = check_shape(adapter, model)
    model.eval()
    for fix in adapter.fixes:  # known upstream bugs, corrected before any trace
        fix(model)
    with warnings.catch_warnings():  # BLIP's `*.output` submodules: handled by forward.envoy_at
        warnings.filterwarnings("ignore", message=".*which nnsight already serves")
        envoy = NNsight(model)
    return VLM(
        model=model,
        processor=processor,
        adapter=adapter,
        shape=shape,
        envoy=envoy,
        name=name,
        revision=revision,
    )


def resolve(name: str) -> str:
    """A shipped organism's short name -> its directory; anything else is returned unchanged."""
    if Path(name).exists():
        return name
    try:
        from .zoo import ORGANISMS, PLANTED, organism_dir
    except ImportError:  # the zoo is optional at import time (e.g. while it is being built)
        return name
    return str(organism_dir(name)) if name in ORGANISMS or name in PLANTED else name


def describe(name: str, *, revision: str | None = None) -> tuple[str, Any, Any, type]:
    """(path, config, processor, model class) of a model, without reading its weights.

    The architecture and its config are checked against the adapters here, so an unsupported
    model (or a class vlmtrace refuses, or a variant such as BLIP-2 with a language model no
    adapter describes) fails in a second with a message saying why, not after a 14 GB download.
    """
    path = resolve(name)
    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        held = sorted(p.name for p in folder.iterdir())[:5]
        raise NotAModelError(
            f"{name} is a folder but not a model: it has no config.json (it holds {held or 'nothing'}). "
            "Give a Hugging Face model folder (config.json, processor files and weights), a Hub repo id, "
            "or a shipped organism (shapes-llava, shapes-blip)."
        )
    config = transformers.AutoConfig.from_pretrained(path, revision=revision)
    architecture = (getattr(config, "architectures", None) or ["<none in config>"])[0]
    adapter = adapter_for(architecture, config)
    model_class = getattr(transformers, architecture, None)
    if model_class is None:
        raise UnknownArchitectureError(
            f"{name}: config names {architecture}, which this transformers "
            f"({transformers.__version__}) does not provide; upgrade transformers."
        )
    if not adapter.image_in_sequence and "image" not in adapter.embeddings:  # text-only: tokenizer
        processor = transformers.AutoTokenizer.from_pretrained(path, revision=revision)
    else:
        processor = load_processor(path, revision=revision)  # image-only where video needs torchvision
    return path, config, processor, model_class


def load(
    name: str,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    attn_implementation: str = "eager",
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
) -> VLM:
    """Load a model and its processor; `device` is "cpu", "cuda", "cuda:N" or "auto".

    `device="auto"` is for a model larger than one GPU: accelerate's device map fills every
    GPU, then CPU memory, then `offload_folder` on disk, layer by layer, and hooks move
    activations between them. `max_memory` caps what each may hold, e.g. `{0: "20GiB",
    1: "20GiB", "cpu": "60GiB"}`. Sweeps on a model split so equal the unsplit model's
    (`tests/test_device_map.py`, over CPU and disk).
    """
    check_device(device)
    if device != "auto" and (max_memory is not None or offload_folder is not None):
        raise DevicePlacementError(
            "max_memory and offload_folder place a model over several devices: give device='auto' "
            f"with them (got device={device!r})."
        )
    path, _, processor, model_class = describe(name, revision=revision)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"revision": revision, "attn_implementation": attn_implementation}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device == "auto":
        kwargs["device_map"] = "auto"
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    model = model_class.from_pretrained(path, **kwargs)
    if device != "auto":
        model = model.to(device)
    else:
        check_first_layers_in_memory(model)
    return wrap(model, processor, name=name, revision=revision or _commit_of(model))


class NotAModelError(UserError):
    """A path that holds no model, or a device this machine does not have."""


class DevicePlacementError(UserError):
    """Placement over several devices (max_memory, offload_folder) asked for without device="auto"."""


def check_device(device: str) -> None:
    """Refuse a device torch does not know, or one this machine lacks, before anything loads."""
    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise NotAModelError(
            f"device {device!r} is not a device; use cpu, cuda, cuda:N (N: the GPU's index) or auto."
        ) from None
    if parsed.type in ("cpu", "meta"):
        return
    if parsed.type == "cuda" and torch.version.cuda is None and torch.version.hip is None:
        raise NotAModelError(
            f"device {device!r}: this torch ({torch.__version__}) is a CPU-only build, so it cannot use a "
            "GPU. Install a CUDA build of torch (pytorch.org, 'Get started') on the machine with the GPU, "
            "or use --device cpu."
        )
    backend = getattr(torch, parsed.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise NotAModelError(
            f"device {device!r}: this machine has no {parsed.type} device that torch can use (no such "
            "GPU, or its driver is not loaded); use --device cpu, or run on the machine with the GPU."
        )
    count = getattr(backend, "device_count", lambda: 0)()
    if parsed.index is not None and count and parsed.index >= count:
        raise NotAModelError(
            f"device {device!r}: this machine has {count} {parsed.type} device(s), 0..{count - 1}."
        )


def check_first_layers_in_memory(model: torch.nn.Module) -> None:
    """Refuse a device map that offloaded the model's first modules to disk.

    nnsight moves a trace's inputs to the device of the model's first parameter; offloaded to
    disk, that parameter is on the meta device, and every forward would fail deep inside
    accelerate ("Cannot copy out of meta tensor"). A map filled in order puts the first
    modules on the first device unless that device is given too little memory.
    """
    first = next(model.parameters()).device
    if first.type == "meta":
        placement = getattr(model, "hf_device_map", {})
        raise DevicePlacementError(
            f"device='auto' offloaded the model's first modules to disk ({next(iter(placement), '?')} -> "
            f"{next(iter(placement.values()), '?')}), where inputs cannot go. Give the first device more "
            "memory in max_memory (it must hold at least the first module)."
        )


def _commit_of(model: torch.nn.Module) -> str | None:
    """The hub commit the weights came from, when transformers recorded one."""
    return getattr(model.config, "_commit_hash", None)
