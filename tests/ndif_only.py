"""Run captured remote requests as an NDIF server would: only NDIF's packages can be imported.

    python -I tests/ndif_only.py JOBS.json OUT_DIR

NDIF's servers import torch, numpy, transformers, accelerate, einops, nnsight and the standard
library, and nothing else: a request whose pickled code names `vlmtrace`, xarray, PIL, ... fails
there. Each job of JOBS.json (`{name: {"payload": file, "model": saved model directory}}`) loads
its model with plain transformers + nnsight, then deserializes and executes the payload as
`vlmtrace.remote.worker.run_request` does, with a `sys.meta_path` finder that refuses every
other module, installed before anything is unpickled. Modules that importing torch,
transformers and nnsight brought in but that NDIF need not have (PIL, say) are dropped from
`sys.modules` first, so a payload cannot reach them through the cache either. The packages those
six distributions require (without extras) are allowed: a server has them because it has those.

Writes OUT_DIR/NAME.pt (the saved values) or OUT_DIR/NAME.error (the exception) per job.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import json
import sys
import traceback
from pathlib import Path

NDIF_PACKAGES = ("torch", "numpy", "transformers", "accelerate", "einops", "nnsight")


def allowed_modules() -> set[str]:
    """Top-level module names of NDIF's packages and of every package they require."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    provides: dict[str, set[str]] = {}
    for module, distributions in importlib.metadata.packages_distributions().items():
        for distribution in distributions:
            provides.setdefault(canonicalize_name(distribution), set()).add(module)
    seen: set[str] = set()
    todo = [canonicalize_name(name) for name in NDIF_PACKAGES]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here (accelerate, einops): nothing of it can be imported
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    modules = {module for name in seen for module in provides.get(name, ())}
    return modules | set(sys.stdlib_module_names) | {"__main__", "builtins"}


class OnlyNdifPackages(importlib.abc.MetaPathFinder):
    """Refuses to find any module outside `allowed` (an ImportError at the import statement)."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] not in self.allowed:
            raise ModuleNotFoundError(f"No module named {name!r} (not on an NDIF server)", name=name)
        return None


def main(jobs_file: str, out_dir: str) -> None:
    import torch
    import transformers
    from nnsight import NNsight
    from nnsight.schema.request import RequestModel
    from nnsight.tracing.tracer import _saves, dec, inc

    torch.set_num_threads(1)
    jobs = json.loads(Path(jobs_file).read_text())
    models = {}
    for name, job in jobs.items():
        config = transformers.AutoConfig.from_pretrained(job["model"])
        model_class = getattr(transformers, config.architectures[0])
        models[name] = model_class.from_pretrained(job["model"], attn_implementation="eager").eval()
    allowed = allowed_modules()
    for module in list(sys.modules):
        if module.split(".")[0] not in allowed:
            del sys.modules[module]
    sys.meta_path.insert(0, OnlyNdifPackages(allowed))
    out = Path(out_dir)
    for name, job in jobs.items():
        try:
            envoy = NNsight(models[name])
            persistent = {"Interleaver": envoy.interleaver}
            persistent |= {f"Module:{e.path}": e._module for e in envoy.modules()}
            payload = Path(job["payload"]).read_bytes()
            tracer = RequestModel.deserialize(payload, persistent, compress=True)
            inc()
            try:
                with torch.no_grad():
                    tracer.execute(tracer.info.code)
                saved = _saves()
                values = {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in saved}
            finally:
                dec()
            torch.save(values, out / f"{name}.pt")
        except BaseException as error:  # noqa: BLE001 (every failure is this job's result)
            lines = traceback.format_exception(type(error), error, error.__traceback__)
            (out / f"{name}.error").write_text("".join(lines[-6:]))


if __name__ == "__main__":
    main(*sys.argv[1:3])
