"""Every family of the support matrix, remotely: served by `vlmtrace serve`, and on NDIF's terms.

For each family a tiny model is built (`tests/families/`, conftest's BLIP, the text LMs of
`test_transformer_lens`), saved with its processor, and swept over a few cells of one site (Gaussian
noise on the image; token replacement for the text LMs), in several forwards so that a remote
sweep groups them into sessions (`vlmtrace.engine.sweep.run_forwards`).

- Served: the saved directory is served by `vlmtrace serve` in a subprocess and the remote sweep
  must equal the local one bit for bit. Families are served a few at a time (`GROUP`): the server
  loads each model in a process of its own before it answers, and all of them at once would hold
  gigabytes and take minutes to start on a busy 2-core machine. Marked slow (about 5 minutes in
  all): `pytest -m slow tests/test_remote_families.py`, and `tests/support_matrix.py` runs it.
- NDIF-clean: the sweep's largest request is captured as the client would POST it, then run by
  `tests/ndif_only.py` in one fresh process where only NDIF's packages import, against the saved
  model loaded with plain transformers; its saved values must equal the client's.

A family that cannot be served here says why in `NOT_SERVED` (the test checks the reason still
holds, then skips with it, and the support matrix shows it). `python tests/support_matrix.py`
fills the matrix's `remote` and `ndif` columns from these tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr
from served import Server
from test_families import FAMILIES, sample_of

import vlmtrace as vt
from vlmtrace.engine.metrics import Probability
from vlmtrace.models.build import word_tokenizer
from vlmtrace.models.processor import save_processor
from vlmtrace.remote import ServerBackend, backend, client, model_key
from vlmtrace.remote.client import shipped_by_value

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

GROUP = 6
"""Families per server."""
MAX_BATCH = 5
"""Rows per forward: one or a few cells next to the baseline rows, so that a sweep of a few cells
makes several forwards and its remote requests hold groups of them."""
NOT_SERVED = {
    "mistral3": (
        ImportError,
        "torchvision",
        "its PixtralProcessor cannot be imported without torchvision, which does not install "
        "beside torch 2.13 CPU here, so `vlmtrace serve` cannot load it",
    ),
}
"""Family -> (error, words of its message) that loading its saved directory raises here, and why
it cannot be served on this machine."""
OPEN_KEY = "key-of-the-family-servers"
LM_WORDS = "the cat dog sat on mat in city of paris rome".split()


@dataclass
class Case:
    """One family's tiny model and the sweep it is tested with."""

    model: torch.nn.Module
    processor: Any
    sample: vt.Sample
    corruption: Any
    site: str
    max_batch: int = MAX_BATCH


def vlm_case(name: str) -> Case:
    family = FAMILIES[name]
    model, processor = family.build()
    site = "mlp" if "mlp" in family.sites else sorted(family.sites)[0]
    noise = vt.GaussianNoise("image", scale=3.0, samples=2, seed=5)
    return Case(model, processor, sample_of(family), noise, site)


def blip_case() -> Case:
    from conftest import WORDS, random_image  # the same tiny BLIP as the other BLIP tests

    from vlmtrace.models.build import build_blip

    model, processor = build_blip(word_tokenizer(WORDS), layers=2, seed=2)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter.dim() == 2 and "embeddings" not in parameter_name:
                parameter.normal_(0.0, 0.15, generator=generator)
    sample = vt.Sample(
        prompt="which city did this shape represent in year 2006 ?",
        answer="paris",
        image=random_image(0),
        spans={"visual": "this shape"},
        id="blip",
    )
    return Case(model, processor, sample, vt.GaussianNoise("image", samples=2, seed=5), "mlp")


def lm_case(architecture: str) -> Case:
    import transformers

    tokenizer = word_tokenizer(LM_WORDS)
    special = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.3,
    )
    if architecture == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **special)
    else:
        config = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **special
        )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    sample = vt.Sample(
        prompt="the cat sat on the mat in the city of", answer="paris", spans={"visual": "cat"}, id="lm"
    )
    # one cell per forward next to the 2 baseline rows: 4 forwards, the last 3 in one session
    return Case(model, tokenizer, sample, vt.SymmetricTokenReplacement("visual", text="dog"), "mlp", 3)


BUILDERS = {name: (lambda name=name: vlm_case(name)) for name in FAMILIES}
BUILDERS |= {"blip": blip_case, "gpt2": lambda: lm_case("gpt2"), "llama": lambda: lm_case("llama")}
NAMES = sorted(BUILDERS)


def sweep(vlm: vt.VLM, case: Case, **extra) -> xr.Dataset:
    grid = vt.Grid(sites=(case.site,), windows=(1,), segments=("visual", "last"))
    return vt.patch(
        vlm,
        [case.sample],
        corruption=case.corruption,
        grid=grid,
        max_batch=case.max_batch,
        progress=False,
        **extra,
    )


def same_values(a: xr.Dataset, b: xr.Dataset) -> bool:
    """Identical data and coordinates (attrs differ by creation time)."""
    return a.drop_attrs().identical(b.drop_attrs())


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    return {name: build() for name, build in BUILDERS.items()}


def as_checkpoint(processor: Any) -> Any:
    """The processor as a checkpoint of its family holds it. A processor class defined by the tests
    (InternVL's, without its video half) is saved under its transformers base class, image-only,
    so that `vt.load` finds that class in the folder, as it would in a real checkpoint."""
    import copy

    cls = type(processor)
    if cls.__module__.split(".")[0] == "transformers":
        return processor
    base = next(b for b in cls.__mro__ if b.__module__.split(".")[0] == "transformers")
    made = copy.copy(processor)
    made.__class__ = base
    made.video_processor = None
    return made


@pytest.fixture(scope="module")
def saved(cases, tmp_path_factory) -> dict[str, str]:
    """Family -> the directory its model and processor were saved to."""
    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for name, case in cases.items():
        case.model.save_pretrained(root / name)
        save_processor(as_checkpoint(case.processor), root / name)
        dirs[name] = str(root / name)
    return dirs


class Servers:
    """One `vlmtrace serve` per group of `GROUP` served families, started when a family of the
    group is first asked for; the previous group's server is stopped then."""

    def __init__(self, dirs: dict[str, str], logs: Path) -> None:
        served = [name for name in NAMES if name not in NOT_SERVED]
        self.groups = [served[i : i + GROUP] for i in range(0, len(served), GROUP)]
        self.dirs, self.logs = dirs, logs
        self.current: tuple[int, Server] | None = None

    def url_for(self, name: str) -> str:
        index = next(i for i, group in enumerate(self.groups) if name in group)
        if self.current is None or self.current[0] != index:
            self.stop()
            models = [self.dirs[member] for member in self.groups[index]]
            server = Server(models, self.logs / f"group{index}.log", api_key=OPEN_KEY)
            self.current = (index, server.wait_ready())
        return self.current[1].url

    def stop(self) -> None:
        if self.current is not None:
            self.current[1].stop()
            self.current = None


@pytest.fixture(scope="module")
def servers(saved, tmp_path_factory):
    started = Servers(saved, tmp_path_factory.mktemp("logs"))
    try:
        yield started
    finally:
        started.stop()


@pytest.mark.slow  # about 1 min per group of served families on a busy 2-core machine
@pytest.mark.parametrize("name", NAMES)
def test_a_sweep_served_by_vlmtrace_serve_equals_the_local_sweep(name, cases, saved, servers, monkeypatch):
    if name in NOT_SERVED:
        # the reason must still hold where the server loads it, a fresh process (here the family's
        # test module may have made the class importable): else serve the family
        error, words, reason = NOT_SERVED[name]
        loading = subprocess.run(
            [sys.executable, "-c", "import sys, vlmtrace; vlmtrace.load(sys.argv[1])", saved[name]],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert loading.returncode != 0 and f"{error.__name__}" in loading.stderr, loading.stderr[-2000:]
        assert words in loading.stderr, loading.stderr[-2000:]
        pytest.skip(reason)
    monkeypatch.setenv("NDIF_API_KEY", OPEN_KEY)
    vlm = vt.load(saved[name])
    local = sweep(vlm, cases[name])
    remote = sweep(vlm, cases[name], backend=backend(vlm, host=servers.url_for(name)))
    assert np.isfinite(local[cases[name].site].values).sum() >= 4  # several forwards' cells
    assert same_values(local, remote)


class Captured(ServerBackend):
    """Serializes each request exactly as for a server, keeps the payload and the values saved
    by running it here."""

    def __call__(self, tracer=None):
        from nnsight.tracing.tracer import _saves

        payload = self._serialize(tracer)
        tracer.execute(tracer.info.code)
        saved = _saves()
        values = {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in saved}
        self.requests.append((payload, values))


def captured_request(case: Case, name: str, **extra) -> tuple[bytes, dict]:
    """The largest request (payload, values saved here) of the family's sweep."""
    vlm = vt.wrap(case.model, case.processor, name=f"tiny-{name}")
    capture = Captured(model_key(vlm.name), host="http://unused")
    capture.requests = []
    sweep(vlm, case, backend=capture, **extra)
    return max(capture.requests, key=lambda request: len(request[0]))


def run_where_only_ndif_imports(jobs: dict[str, tuple[bytes, str]], folder: Path) -> Path:
    """Run each job's (payload, model directory) through `tests/ndif_only.py`, all in one fresh
    process (it starts in seconds, the requests in milliseconds); its results folder (NAME.pt or
    NAME.error)."""
    files = {}
    for name, (payload, model) in jobs.items():
        (folder / f"{name}.payload").write_bytes(payload)
        files[name] = {"payload": str(folder / f"{name}.payload"), "model": model}
    (folder / "jobs.json").write_text(json.dumps(files))
    out = folder / "out"
    out.mkdir()
    script = Path(__file__).with_name("ndif_only.py")
    subprocess.run(
        [sys.executable, "-I", str(script), str(folder / "jobs.json"), str(out)],
        check=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return out


class ProbabilityThatImportsXarray(Probability):
    """P(answer), from a metric that imports xarray while the trace runs."""

    def __call__(self, logits, answer, foil):
        import xarray  # noqa: F401 (what NDIF's servers cannot import)

        return Probability.__call__(self, logits, answer, foil)


def requests_ndif_refuses(llava: Case) -> dict[str, bytes]:
    """LLaVA's request, spoiled two ways: the metrics module no longer travels by value (the
    payload names `vlmtrace.engine.metrics`), and a metric shipped by value imports xarray."""
    shipped = tuple(module for module in client.ENGINE_MODULES if module != "vlmtrace.engine.metrics")
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(client, "ENGINE_MODULES", shipped)
        names_vlmtrace = captured_request(llava, "llava")[0]
    with shipped_by_value(sys.modules[__name__]):
        imports_xarray = captured_request(llava, "llava", metric=ProbabilityThatImportsXarray())[0]
    return {"names_vlmtrace": names_vlmtrace, "imports_xarray": imports_xarray}


@pytest.fixture(scope="module")
def ndif_runs(cases, saved, tmp_path_factory):
    """Family (or spoiled request) -> (values saved by the client's own run, or None; the
    NDIF-only process's results folder)."""
    captured = {name: captured_request(case, name) for name, case in cases.items()}
    jobs = {name: (payload, saved[name]) for name, (payload, _) in captured.items()}
    spoiled = requests_ndif_refuses(cases["llava"])
    jobs |= {name: (payload, saved["llava"]) for name, payload in spoiled.items()}
    out = run_where_only_ndif_imports(jobs, tmp_path_factory.mktemp("ndif"))
    return {name: (captured[name][1] if name in captured else None, out) for name in jobs}


def equal(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of nested lists / tuples / dicts of tensors."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(equal, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("name", NAMES)
def test_a_familys_request_runs_where_only_ndif_packages_import(name, ndif_runs):
    here, out = ndif_runs[name]
    error = out / f"{name}.error"
    assert not error.exists(), (
        f"{name}'s request failed where only NDIF's packages import:\n{error.read_text()}"
    )
    there = torch.load(out / f"{name}.pt")
    assert there and equal(here, there)


def test_a_request_that_names_vlmtrace_fails_where_only_ndif_packages_import(ndif_runs):
    _, out = ndif_runs["names_vlmtrace"]
    assert "No module named 'vlmtrace" in (out / "names_vlmtrace.error").read_text()


def test_a_shipped_function_that_imports_xarray_fails_where_only_ndif_packages_import(ndif_runs):
    _, out = ndif_runs["imports_xarray"]
    assert "No module named 'xarray'" in (out / "imports_xarray.error").read_text()
