"""Remote sweeps, end to end over real sockets: `vlmtrace serve` in a subprocess on 127.0.0.1.

The tiny models are saved to a directory that the servers and the client both load, so a
remote run and a local run compute with the same weights and must agree bit for bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import websocket
import xarray as xr
from nnsight.schema.config import CONFIG
from nnsight.schema.response import Status
from typer.testing import CliRunner

import vlmtrace as vt
import vlmtrace.engine.sweep as sweep
from vlmtrace.cli import app
from vlmtrace.engine.forward import driver
from vlmtrace.recipes import information_flow, notice, visual_constraint
from vlmtrace.remote import RemoteError, ServerBackend, ServerUnavailableError, backend, model_key
from vlmtrace.remote.client import shipped_by_value
from vlmtrace.remote.keys import served_name

sys.path.insert(0, str(Path(__file__).parent))
from served import Server  # noqa: E402

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "k3y-that-must-never-leak"
OPEN_KEY = "key-of-the-open-servers"
"""Every server requires a key; the tests' clients hold OPEN_KEY unless a test says otherwise."""
TEST_TIMEOUT = 180


@pytest.fixture(autouse=True)
def bounded():
    """No test here may hang on a socket: SIGALRM ends it."""

    def expire(signum, frame):
        raise TimeoutError(f"test ran past {TEST_TIMEOUT} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_TIMEOUT)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def client_key(monkeypatch):
    """The key of the open servers, where nnsight's client reads it (NDIF_API_KEY)."""
    monkeypatch.setenv("NDIF_API_KEY", OPEN_KEY)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_llava, tiny_blip) -> dict[str, str]:
    root = tmp_path_factory.mktemp("served")
    dirs = {}
    for name, vlm in {"llava": tiny_llava, "blip": tiny_blip}.items():
        vlm.model.save_pretrained(root / name)
        vlm.processor.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


@pytest.fixture(scope="module")
def servers(model_dirs, tmp_path_factory):
    """Three servers, started together (each takes seconds to import torch and load)."""
    logs = tmp_path_factory.mktemp("logs")
    llava, blip = model_dirs["llava"], model_dirs["blip"]
    started = {
        "open": Server([llava, blip], logs / "open.log", api_key=OPEN_KEY),
        "keyed": Server([llava], logs / "keyed.log", api_key=KEY),
        "doomed": Server([llava], logs / "doomed.log", api_key=OPEN_KEY),
    }
    try:
        yield {name: server.wait_ready() for name, server in started.items()}
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def llava(model_dirs) -> vt.VLM:
    return vt.load(model_dirs["llava"])


@pytest.fixture(scope="module")
def blip(model_dirs) -> vt.VLM:
    return vt.load(model_dirs["blip"])


@pytest.fixture
def no_key_configured(monkeypatch):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)


def same_values(a: xr.Dataset, b: xr.Dataset) -> bool:
    """Identical data and coordinates (attrs differ by creation time)."""
    return a.drop_attrs().identical(b.drop_attrs())


def patch_kwargs(**extra):
    grid = vt.Grid(sites=("mlp",), windows=(1,), skip=("image",))
    return dict(corruption=vt.ReplaceSpan("visual"), grid=grid, progress=False, **extra)


def test_a_recipe_sweep_run_remotely_equals_the_local_run_bit_for_bit(servers, llava, llava_sample):
    local = visual_constraint.run(llava, [llava_sample], options=vt.Options(progress=False))
    remote_options = vt.Options(progress=False, backend=backend(llava, host=servers["open"].url))
    remote = visual_constraint.run(llava, [llava_sample], options=remote_options)
    assert same_values(local, remote)


def test_an_attention_knockout_recipe_runs_remotely_bit_for_bit(servers, llava, llava_sample):
    # the object region: two patches of the 4 x 4 grid (information_flow refuses a sample without one)
    sample = llava_sample.with_(meta={"region_cells": [(1, 1), (1, 2)], "region_grid": 4})
    local = information_flow.run(llava, [sample], options=vt.Options(progress=False))
    remote_options = vt.Options(progress=False, backend=backend(llava, host=servers["open"].url))
    remote = information_flow.run(llava, [sample], options=remote_options)
    assert same_values(local, remote)


def test_notice_with_its_attention_patterns_runs_remotely_bit_for_bit(servers, llava, llava_sample):
    local = notice.run(llava, [llava_sample], options=vt.Options(progress=False))
    remote_options = vt.Options(progress=False, backend=backend(llava, host=servers["open"].url))
    remote = notice.run(llava, [llava_sample], options=remote_options)
    assert same_values(local, remote)
    assert float(abs(remote["attention"]).sum()) > 0


def test_blip_with_seeded_image_noise_runs_remotely_bit_for_bit(servers, blip, blip_sample):
    kwargs = dict(
        corruption=vt.GaussianNoise("image", samples=2), grid=vt.Grid(sites=("mlp",)), progress=False
    )
    local = vt.patch(blip, [blip_sample], **kwargs)
    remote = vt.patch(blip, [blip_sample], backend=backend(blip, host=servers["open"].url), **kwargs)
    assert same_values(local, remote)


def test_a_sweep_that_polls_instead_of_streaming_equals_the_local_run(servers, llava, llava_sample):
    local = vt.patch(llava, [llava_sample], **patch_kwargs(max_batch=12))
    polling = backend(llava, host=servers["open"].url, mode="poll", poll_interval=0.02, timeout=60)
    remote = vt.patch(llava, [llava_sample], **patch_kwargs(max_batch=12, backend=polling))
    assert same_values(local, remote)


def submit_logits(vlm: vt.VLM, sample: vt.Sample, remote: ServerBackend, delay: float) -> None:
    """Submit one hand-written trace that sleeps `delay` seconds on the server."""
    row = vlm.adapter.encode(vlm.processor, sample.prompt, sample.image)
    batch = {name: value[None] for name, value in row.items()}
    envoy = vlm.envoy
    with envoy.trace(fn=driver(vlm), backend=remote, **batch) as tracer:
        time.sleep(delay)
        logits = tracer.result.save()  # noqa: F841 (collected with wait())


def test_a_submitted_trace_returns_at_once_and_polling_brings_its_saved_values(servers, llava, llava_sample):
    url = servers["open"].url
    slow, queued = (backend(llava, host=url, mode="submit", poll_interval=0.02) for _ in range(2))
    started = time.monotonic()
    submit_logits(llava, llava_sample, slow, delay=1.5)
    submit_logits(llava, llava_sample, queued, delay=0.0)
    assert time.monotonic() - started < 1.5 and slow.job_id and queued.job_id
    while queued.poll() is None and queued.status == Status.RECEIVED:
        time.sleep(0.02)
    assert queued.status == Status.QUEUED  # the slow job holds the model
    row = llava.adapter.encode(llava.processor, llava_sample.prompt, llava_sample.image)
    with torch.no_grad():
        expected = driver(llava)(**{name: value[None] for name, value in row.items()})
    assert torch.equal(queued.wait(timeout=30)["logits"], expected)
    assert torch.equal(slow.wait(timeout=30)["logits"], expected)


class ExplodesOnTheLastChunk(vt.Probability):
    """P(answer), except that a chunk with fewer rows than `max_batch` raises (on the server)."""

    def __call__(self, logits, answer, foil):
        if logits.shape[0] < 6:
            raise RuntimeError("metric exploded on the server")
        return vt.Probability()(logits, answer, foil)


def test_a_trace_that_raises_on_the_server_is_a_remote_error_and_its_chunk_is_not_written(
    servers, llava, llava_sample, tmp_path
):
    # verify=False: the self-check's one-row forwards would explode before any chunk
    kwargs = patch_kwargs(
        max_batch=6, metric=ExplodesOnTheLastChunk(), store=tmp_path / "t.zarr", verify=False
    )
    with shipped_by_value(sys.modules[__name__]), pytest.raises(RemoteError) as raised:
        vt.patch(llava, [llava_sample], backend=backend(llava, host=servers["open"].url), **kwargs)
    assert "RuntimeError: metric exploded on the server" in str(raised.value)
    partial = vt.open_result(tmp_path / "t.zarr")
    written = int(partial["progress"].sum())
    assert written > 0 and written % 4 == 0 and not partial["done"].any()  # whole 4-cell chunks only
    assert int(np.isfinite(partial["mlp"].values).sum()) == written


class RunsOutOfMemoryAboveFourRows(vt.Probability):
    """P(answer), but a batch of more than 4 rows "runs out of memory" (on the server)."""

    def __call__(self, logits, answer, foil):
        if logits.shape[0] > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return vt.Probability()(logits, answer, foil)


def test_a_chunk_that_runs_out_of_memory_on_the_server_is_halved_and_retried(servers, llava, llava_sample):
    kwargs = patch_kwargs(max_batch=6, metric=RunsOutOfMemoryAboveFourRows())
    with shipped_by_value(sys.modules[__name__]):
        remote = vt.patch(llava, [llava_sample], backend=backend(llava, host=servers["open"].url), **kwargs)
    local = vt.patch(llava, [llava_sample], **patch_kwargs(max_batch=4))
    assert remote["done"].all() and np.allclose(remote["mlp"], local["mlp"], equal_nan=True)


def test_a_missing_api_key_is_refused_with_a_message_that_says_what_to_set(
    servers, llava, llava_sample, no_key_configured
):
    with pytest.raises(RemoteError, match="requires an API key .* set NDIF_API_KEY"):
        vt.patch(llava, [llava_sample], **patch_kwargs(backend=backend(llava, host=servers["keyed"].url)))


def test_a_wrong_api_key_is_refused_on_http_and_on_the_websocket(servers, no_key_configured):
    url = servers["keyed"].url
    wrong = {"ndif-api-key": "not-the-key"}
    assert httpx.get(f"{url}/response/anything", headers=wrong, timeout=10).status_code == 401
    assert httpx.post(f"{url}/request", headers=wrong, data={"data": "{}"}, timeout=10).status_code == 401
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(
            f"ws://127.0.0.1:{url.rsplit(':', 1)[1]}/subscribe", header=wrong, timeout=10
        )
    assert refused.value.status_code == 401
    right = websocket.create_connection(
        f"ws://127.0.0.1:{url.rsplit(':', 1)[1]}/subscribe", header={"ndif-api-key": KEY}, timeout=10
    )
    assert "session_id" in right.recv()
    right.close()


def test_the_api_key_appears_in_no_store_attrs_log_line_or_error(
    servers, llava, llava_sample, tmp_path, no_key_configured
):
    url = servers["keyed"].url
    ds = vt.patch(
        llava,
        [llava_sample],
        **patch_kwargs(store=tmp_path / "k.zarr", backend=backend(llava, host=url, api_key=KEY)),
    )
    messages = []
    for mode in ("stream", "poll"):
        with pytest.raises(RemoteError) as refused:
            vt.patch(
                llava,
                [llava_sample],
                **patch_kwargs(backend=backend(llava, host=url, api_key=KEY + "x", mode=mode)),
            )
        messages.append(str(refused.value))
    assert all("not the key this server was started with" in m for m in messages)
    stored = vt.open_result(tmp_path / "k.zarr")
    for text in [str(ds.attrs), str(stored.attrs), *messages, servers["keyed"].log.read_text()]:
        assert KEY not in text


def test_an_unknown_model_is_refused_with_the_names_the_server_serves(
    servers, llava, llava_sample, model_dirs
):
    stranger = backend(llava, host=servers["open"].url, model_key="no-such-model")
    with pytest.raises(RemoteError, match="does not serve 'no-such-model'; it serves") as refused:
        vt.patch(llava, [llava_sample], **patch_kwargs(backend=stranger))
    assert model_dirs["llava"] in str(refused.value) and isinstance(refused.value, vt.UserError)


def test_the_server_going_away_mid_sweep_is_a_clear_error_and_a_rerun_resumes(
    servers, llava, llava_sample, tmp_path, monkeypatch
):
    store = tmp_path / "t.zarr"
    whole = vt.patch(llava, [llava_sample], **patch_kwargs(max_batch=6))
    calls = {"n": 0}
    original = sweep.run_plans

    def server_dies_before_the_second_request(*args, **kwargs):
        calls["n"] += 1  # the first request holds one forward, to time it; the second the rest
        if calls["n"] == 2:
            servers["doomed"].stop()
        return original(*args, **kwargs)

    monkeypatch.setattr(sweep, "run_plans", server_dies_before_the_second_request)
    with pytest.raises(ServerUnavailableError, match="lost the server at .* rerun the same call to resume"):
        vt.patch(
            llava,
            [llava_sample],
            **patch_kwargs(max_batch=6, store=store, backend=backend(llava, host=servers["doomed"].url)),
        )
    assert calls["n"] == 2
    assert int(vt.open_result(store)["progress"].sum()) == 4  # the first forward's cells: 6 rows - 2
    monkeypatch.setattr(sweep, "run_plans", original)
    resumed = vt.patch(
        llava,
        [llava_sample],
        **patch_kwargs(max_batch=6, store=store, backend=backend(llava, host=servers["open"].url)),
    )
    assert same_values(resumed, whole)


def test_a_remote_sweep_sends_its_forwards_in_a_few_requests(servers, llava, llava_sample, monkeypatch):
    """One request per forward was 1-6 s of round trip each; forwards now travel in groups sized
    to the backend's `request_seconds`, and the values do not change."""
    local = vt.patch(llava, [llava_sample], **patch_kwargs(max_batch=6))
    requests = {"n": 0, "forwards": 0}
    original = sweep.run_plans

    def counted(vlm, plans, *args, **kwargs):
        requests["n"] += 1
        requests["forwards"] += len(plans)
        return original(vlm, plans, *args, **kwargs)

    monkeypatch.setattr(sweep, "run_plans", counted)
    remote = vt.patch(
        llava, [llava_sample], **patch_kwargs(max_batch=6, backend=backend(llava, host=servers["open"].url))
    )
    assert same_values(remote, local)
    cells = int(np.isfinite(local["mlp"].values).sum())
    assert requests["forwards"] == -(-cells // 4) > 2  # every forward ran, 4 cells each ...
    assert requests["n"] == 2  # ... in two requests: the first alone, to time it, then the rest

    requests.update(n=0, forwards=0)
    slow = backend(llava, host=servers["open"].url)
    slow.request_seconds = 1e-9  # a server that allows no time: one forward per request again
    again = vt.patch(llava, [llava_sample], **patch_kwargs(max_batch=6, backend=slow))
    assert same_values(again, local)
    assert requests["n"] == requests["forwards"]


def test_serve_refuses_a_public_address_without_an_api_key(no_key_configured):
    args = ["serve", "any-model", "--host", "0.0.0.0", "--public-url", "http://box:8000"]
    result = CliRunner().invoke(app, [*args, "--insecure-no-key"])
    assert result.exit_code != 0
    assert "refusing to listen on 0.0.0.0 without an API key" in result.output


def test_serve_on_every_address_needs_the_public_url_clients_use():
    result = CliRunner().invoke(app, ["serve", "any-model", "--host", "0.0.0.0"])
    assert result.exit_code != 0
    assert "needs --public-url" in " ".join(result.output.replace("│", " ").split())


def test_the_recipe_command_runs_remotely_from_a_model_without_weights(
    servers, llava, llava_sample, model_dirs, tmp_path, monkeypatch
):
    # the random model's own next token is the answer: the check for wrong answers runs on the
    # server too (the client's weights are on the meta device) and keeps the sample
    inputs = llava.processor(text=[llava_sample.prompt], images=[llava_sample.image], return_tensors="pt")
    with torch.no_grad():
        top = int(llava.model(**inputs).logits[0, -1].argmax())
    sample = llava_sample.with_(answer=llava.tokenizer.decode([top]).strip())
    monkeypatch.setattr(visual_constraint, "default_samples", lambda vlm, n, seed: [sample])
    out = tmp_path / "remote.zarr"
    args = ["recipe", "visual_constraint", "--model", model_dirs["llava"], "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--remote", "--host", servers["open"].url])
    assert result.exit_code == 0, result.output
    assert "samples: read 1 questions, kept 1" in result.output
    assert same_values(
        vt.open_result(out), visual_constraint.run(llava, [sample], options=vt.Options(progress=False))
    )


def test_the_recipe_command_with_a_wrong_key_prints_one_paragraph_naming_the_fix_and_exits_2(
    servers, llava_sample, model_dirs, tmp_path, monkeypatch
):
    monkeypatch.setenv("NDIF_API_KEY", "not-the-key")
    monkeypatch.setattr(visual_constraint, "default_samples", lambda vlm, n, seed: [llava_sample])
    args = ["recipe", "visual_constraint", "--model", model_dirs["llava"], "--out", str(tmp_path / "x.zarr")]
    result = CliRunner().invoke(app, [*args, "--remote", "--host", servers["keyed"].url])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in text
    assert "not the key this server was started with. Set NDIF_API_KEY" in text and KEY not in text


# Runs a captured request where vlmtrace cannot be imported, as on NDIF: only nnsight, torch and
# transformers. argv: payload file, model directory, output file.
WITHOUT_VLMTRACE = """
import importlib.abc, sys
class NoVlmtrace(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("vlmtrace", "conftest", "test_remote"):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoVlmtrace())
import torch, transformers
from nnsight import NNsight
from nnsight.schema.request import RequestModel
from nnsight.tracing.tracer import _saves, dec, inc
model = transformers.LlavaForConditionalGeneration.from_pretrained(sys.argv[2], attn_implementation="eager")
envoy = NNsight(model.eval())
persistent = {"Interleaver": envoy.interleaver, **{f"Module:{e.path}": e._module for e in envoy.modules()}}
tracer = RequestModel.deserialize(open(sys.argv[1], "rb").read(), persistent, compress=True)
inc()
with torch.no_grad():
    tracer.execute(tracer.info.code)
torch.save({k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in _saves()}, sys.argv[3])
"""


class Captured(ServerBackend):
    """Serializes each chunk exactly as for a server, keeps the payload, and runs it here."""

    def __call__(self, tracer=None):
        payload = self._serialize(tracer)
        tracer.execute(tracer.info.code)
        self.chunks.append((payload, dict(tracer.info.frame.f_locals)))


def test_a_request_runs_on_a_server_that_has_no_vlmtrace(llava, llava_sample, model_dirs, tmp_path):
    capture = Captured(model_key(llava.name), host="http://unused")
    capture.chunks = []
    grid = vt.Grid(sites=("attn_head",), windows=(1,))
    vt.patch(
        llava, [llava_sample], corruption=vt.GaussianNoise("image", samples=2), grid=grid, backend=capture
    )
    # the first request is the self-check's (the model's own forward); the next, the first chunk
    payload, here = next((payload, saved) for payload, saved in capture.chunks if "values" in saved)
    (tmp_path / "payload").write_bytes(payload)
    subprocess.run(
        [sys.executable, "-c", WITHOUT_VLMTRACE, "payload", model_dirs["llava"], "out.pt"],
        cwd=tmp_path,
        check=True,
        timeout=90,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    there = torch.load(tmp_path / "out.pt")
    assert sorted(there) == ["probes", "values"]
    assert torch.equal(there["values"], here["values"]) and torch.equal(there["probes"], here["probes"])


def test_model_keys_name_hub_models_as_ndif_does_and_local_models_by_name(model_dirs):
    key = model_key("llava-hf/llava-1.5-7b-hf")
    ndif = 'nnsight.modeling.transformers.TransformersModel:{"repo_id": "%s", "revision": null}'
    assert key == ndif % "llava-hf/llava-1.5-7b-hf"
    assert served_name(key) == "llava-hf/llava-1.5-7b-hf"
    assert model_key(model_dirs["llava"]) == model_dirs["llava"] == served_name(model_dirs["llava"])
    assert model_key("shapes-llava") == "shapes-llava"  # a shipped organism, by name
