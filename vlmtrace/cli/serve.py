"""`vlmtrace serve MODEL`: run clients' traces on this machine's model, over NDIF's protocol.

The server executes code that clients send, so it always requires a key: one it is given
(`--api-key`, or NDIF_API_KEY) or one it generates and writes to a 0600 file. Keyless
serving exists only as `--insecure-no-key`, on loopback. `vlmtrace.remote.access` and
docs/remote.md have the checks and the threat model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from .recipe import UNITS


def serve(
    models: Annotated[
        list[str], typer.Argument(help="Models to serve (HF repo id, directory or organism name).")
    ],
    host: Annotated[
        str, typer.Option(help="Address to listen on. 0.0.0.0 (every address) requires --public-url.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free one, printed at start).")
    ] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="NDIF_API_KEY",
            show_default=False,
            help="Key clients must send (they read it from NDIF_API_KEY). Default: a new one, "
            "written to --key-file.",
        ),
    ] = None,
    key_file: Annotated[
        Path | None,
        typer.Option(
            show_default=False,
            help="Where a generated key is written, mode 0600 (default: ~/.vlmtrace/serve-PORT.key). "
            "Deleted when the server stops.",
        ),
    ] = None,
    insecure_no_key: Annotated[
        bool,
        typer.Option(
            "--insecure-no-key",
            help="Serve WITHOUT a key (loopback only): every local user and program can run code as you.",
        ),
    ] = False,
    public_url: Annotated[
        str | None,
        typer.Option(
            help="The address clients use, e.g. https://gpu-box.lab behind a TLS proxy: the Host the server "
            "answers to and the base of result URLs (default: http://HOST:PORT)."
        ),
    ] = None,
    allow_host: Annotated[
        list[str] | None, typer.Option(help="Another host name clients may address the server by.")
    ] = None,
    max_runtime: Annotated[
        float, typer.Option(help="Seconds a request may run; then it is stopped and the model reloaded.")
    ] = 600.0,
    max_body: Annotated[str, typer.Option(help="Largest request body, e.g. 256MiB.")] = "256MiB",
    max_queue: Annotated[
        int, typer.Option(help="Requests waiting or running at once; more get a 'busy' reply.")
    ] = 16,
    result_ttl: Annotated[
        float, typer.Option(help="Seconds an undownloaded result is kept (downloads delete it at once).")
    ] = 600.0,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:N or auto (default: cuda if present).")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Weights dtype, e.g. bfloat16 (default: the checkpoint's).")
    ] = None,
) -> None:
    """Serve models to `backend=vlmtrace.remote.backend(...)` clients and nnsight's RemoteBackend."""
    try:
        from ..remote.access import KeyFileRefused
        from ..remote.server import BindRefused, Limits, check_bind
        from ..remote.server import serve as run_server
        from ..remote.worker import LoadFailed
    except ImportError as error:
        raise typer.BadParameter(
            f"the server needs the 'serve' extra ({error.name} is missing): pip install 'vlmtrace[serve]'."
        ) from None
    try:
        check_bind(host, insecure_no_key=insecure_no_key, public_url=public_url)
    except BindRefused as error:
        raise typer.BadParameter(str(error), param_hint="--host") from None
    if insecure_no_key and api_key:
        raise typer.BadParameter(
            "--insecure-no-key contradicts the API key given (--api-key or NDIF_API_KEY): choose one.",
            param_hint="--insecure-no-key",
        )
    try:
        limits = Limits(
            max_runtime=max_runtime, max_body=size(max_body), max_queue=max_queue, result_ttl=result_ttl
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    if device is not None:  # before the model loads, as the port and host are
        from ..models.load import NotAModelError, check_device

        try:
            check_device(device)
        except NotAModelError as error:
            raise typer.BadParameter(str(error), param_hint="--device") from None
    from .hub import check_model_source

    try:
        run_server(
            models,
            host=host,
            port=port,
            api_key=api_key,
            key_file=key_file,
            insecure_no_key=insecure_no_key,
            public_url=public_url,
            allow_hosts=allow_host or (),
            limits=limits,
            device=device,
            dtype=dtype,
            announce=typer.echo,
            check_model=check_model_source,  # neither shipped, here nor reachable: named before any loads
        )
    except LoadFailed as error:
        raise typer.BadParameter(str(error), param_hint="MODELS") from None
    except BindRefused as error:  # the port is taken, or the address is not this machine's
        raise typer.BadParameter(str(error), param_hint="--host/--port") from None
    except KeyFileRefused as error:
        raise typer.BadParameter(str(error), param_hint="--key-file") from None
    except OSError as error:  # the port is taken, or the key file's folder is not writable
        where = f" ({error.filename})" if error.filename else ""
        raise typer.BadParameter(
            f"could not start the server: {error.strerror or error}{where}. Choose another --port, "
            "or a --key-file in a folder you can write.",
        ) from None


def size(text: str) -> int:
    """'256MiB' / '1GB' / '1000000' -> bytes, with an error that shows the form."""
    number = text.rstrip("BbKkMmGgTtIi ")
    unit = text[len(number) :].strip().upper()
    try:
        if unit not in UNITS:
            raise ValueError
        value = float(number) * UNITS[unit]
        if not math.isfinite(value) or value < 1:
            raise ValueError
        return int(value)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: use a finite size of at least one byte, such as 256MiB or 1GB.",
            param_hint="--max-body",
        ) from None
