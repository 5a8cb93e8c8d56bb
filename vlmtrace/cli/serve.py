"""`vlmtrace serve MODEL`: run clients' traces on this machine's model, over NDIF's protocol.

The server executes code that clients send, so it listens on 127.0.0.1 unless it has an API
key; `vlmtrace.remote.server` has the protocol and the security notes.
"""

from __future__ import annotations

from typing import Annotated

import typer


def serve(
    models: Annotated[
        list[str], typer.Argument(help="Models to serve (HF repo id, directory or organism name).")
    ],
    host: Annotated[
        str, typer.Option(help="Address to listen on. Anything but loopback requires --api-key.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="NDIF_API_KEY",
            show_default=False,
            help="Key clients must send (they read it from NDIF_API_KEY). Required off loopback.",
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:N or auto (default: cuda if present).")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Weights dtype, e.g. bfloat16 (default: the checkpoint's).")
    ] = None,
) -> None:
    """Serve models to `backend=vlmtrace.remote.backend(...)` clients and nnsight's RemoteBackend."""
    try:
        from ..remote.server import BindRefused, check_bind
        from ..remote.server import serve as run_server
    except ImportError as error:
        raise typer.BadParameter(
            f"the server needs the 'serve' extra ({error.name} is missing): pip install 'vlmtrace[serve]'."
        ) from None
    try:
        check_bind(host, api_key)
    except BindRefused as error:
        raise typer.BadParameter(str(error), param_hint="--host") from None
    run_server(models, host=host, port=port, api_key=api_key, device=device, dtype=dtype, announce=typer.echo)
