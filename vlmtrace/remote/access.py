"""Who may reach `vlmtrace serve`, decided before a request's body is read.

The server runs the code its clients send, so reaching it is running code as its owner. A
key alone is not enough: a web page the owner visits can POST a multipart form to
`http://127.0.0.1:8000/request` (a CORS-"simple" request, sent without asking), and DNS
rebinding lets a page's own host name resolve to 127.0.0.1. So every HTTP request and every
websocket handshake passes four checks, in this order, before any byte of its body is read:

1. **Host**: the `Host` header names this server (its bound address, the host of
   `--public-url`, an `--allow-host`, or a loopback name when it listens on loopback);
   anything else is DNS rebinding or a misrouted request: 403.
2. **Origin**: a request that carries `Origin` (browsers always send it on cross-origin
   POSTs and websockets) must come from this server's own origin: 403 otherwise.
3. **Key**: the `ndif-api-key` header equals the server's key (compared in constant time),
   except for `/ping` and result downloads, whose URL holds an unguessable token: 401.
4. **Client**: `POST /request` must carry nnsight's `nnsight-version` header, which no
   browser sends without a CORS preflight that this server never grants: 400.

Before them, a request whose URL carries a key in its query string (`?api_key=...`) is refused
(400): URLs end up in logs, proxies and shell histories. The body of `POST /request` is then
read with a size limit that counts bytes as they arrive (413 past it, whatever
`Content-Length` claimed). Keys are never logged or echoed: `Redacted` cuts query strings from
uvicorn's log lines (it writes a websocket handshake's path whole) and masks the key. The key
file is created new, never through a link or into another user's file (`write_key_file`).

    access = Access(api_key=key, hosts=allowed_hosts("127.0.0.1", public_url=None, extra=()))
    app = Guard(app, access, max_body=256 * 2**20)
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

WILDCARDS = ("0.0.0.0", "::", "")
PUBLIC_PATHS = ("/ping",)
PUBLIC_PREFIXES = ("/result/",)


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IP literals (a name that may resolve anywhere: False)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_key() -> str:
    """A fresh API key: 32 random bytes, URL-safe."""
    return secrets.token_urlsafe(32)


def default_key_file(port: int) -> Path:
    """Where a generated key is written unless `--key-file` says otherwise: one fixed place,
    so a client can fetch it (`ssh gpu-box cat ~/.vlmtrace/serve-8000.key`)."""
    return Path.home() / ".vlmtrace" / f"serve-{port}.key"


class KeyFileRefused(ValueError):
    """The key file's place is not safe to write a key to (another user's file, a link, a file
    a running server holds)."""


class KeyFile:
    """A key file this server created and holds (`flock`) while it runs.

    The lock tells a later server whether a key file at its path belongs to a live server
    (refused) or to one that died (replaced). `remove` deletes the file only if it is still
    the one created here.
    """

    def __init__(self, path: Path, descriptor: int) -> None:
        self.path = path
        self.descriptor = descriptor
        found = os.fstat(descriptor)
        self.identity = (found.st_dev, found.st_ino)

    def remove(self) -> None:
        try:
            found = os.lstat(self.path)
            if (found.st_dev, found.st_ino) == self.identity:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            if self.descriptor >= 0:
                os.close(self.descriptor)  # releases the lock
                self.descriptor = -1


def write_key_file(path: Path, key: str) -> KeyFile:
    """Write `key` to a new file at `path`, readable by its owner only (0600; a new folder 0700).

    The file is created exclusively and without following links (`O_EXCL | O_NOFOLLOW`), so a
    file or link someone else put there first never receives the key, and held (`flock`) until
    the server stops. A key file of this user that no running server holds (its server died)
    is replaced; a link, another user's file, a file a running server holds, and a folder that
    others may write to without the sticky bit are refused.
    """
    import fcntl
    import stat

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    me = os.geteuid()
    folder = os.stat(path.parent)
    if folder.st_uid not in (me, 0) or (folder.st_mode & 0o022 and not folder.st_mode & stat.S_ISVTX):
        raise KeyFileRefused(
            f"the key file's folder {path.parent} can be written by other users (owner uid "
            f"{folder.st_uid}, mode {folder.st_mode & 0o7777:o}), who could swap the file; choose a "
            "--key-file in a folder only you can write."
        )
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        found = None
    if found is not None:
        if stat.S_ISLNK(found.st_mode):
            problem = "a link"
        elif not stat.S_ISREG(found.st_mode):
            problem = "not a regular file"
        elif found.st_uid != me:
            problem = f"owned by uid {found.st_uid}"
        else:
            problem = None
        if problem is not None:
            raise KeyFileRefused(
                f"{path} exists and is {problem}: the key is written only to a new file of your own. "
                "Remove it if it is yours, or choose another --key-file."
            )
        old = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KeyFileRefused(
                f"{path} is the key file of a running server; give this one another --key-file (or "
                "stop that server)."
            ) from None
        finally:
            os.close(old)
        path.unlink()  # this user's key file of a server that died
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise KeyFileRefused(
            f"{path} was created by another process while this server started; choose another --key-file."
        ) from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(descriptor).st_uid != me:
            raise KeyFileRefused(
                f"{path} is not owned by this user after creating it; choose another --key-file."
            )
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, (key + "\n").encode())
    except BaseException:
        os.close(descriptor)
        path.unlink(missing_ok=True)
        raise
    return KeyFile(path, descriptor)


def split_host(netloc: str) -> tuple[str, str | None]:
    """'Host' header or netloc -> (lower-case host name, port or None); IPv6 in brackets."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        host, _, rest = netloc[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    host, colon, port = netloc.rpartition(":")
    if not colon or not port.isdigit():
        return netloc, None
    return host, port


def allowed_hosts(bind: str, *, public_url: str | None, extra: Iterable[str]) -> frozenset[str]:
    """The host names this server answers to (see the module docstring)."""
    names = {name.lower().strip("[]") for name in extra}
    if bind not in WILDCARDS:
        names.add(bind.lower().strip("[]"))
    if public_url:
        names.add((urlsplit(public_url).hostname or "").lower())
    return frozenset(names - {""})


@dataclass(frozen=True)
class Access:
    """The policy the guard enforces."""

    api_key: str | None
    """None only in the explicitly insecure keyless mode."""
    hosts: frozenset[str]
    """Host names (no port) a request's `Host` may name, besides loopback names."""
    loopback_names: bool = True
    """Accept `localhost` / 127.0.0.1 / [::1] as Host (a client on the server's own machine)."""

    def host_refusal(self, host_header: str | None) -> str | None:
        if not host_header:
            return "the request has no Host header; this server answers only requests addressed to it."
        host, _ = split_host(host_header)
        if host in self.hosts or (self.loopback_names and is_loopback(host)):
            return None
        return (
            f"this server does not answer to Host {host_header!r} (DNS rebinding is refused). If that is "
            "the name your clients use, start the server with --public-url http://NAME:PORT or "
            "--allow-host NAME."
        )

    def origin_refusal(self, origin: str | None, host_header: str | None) -> str | None:
        """A cross-site Origin is refused: a browser page must not drive this server."""
        if origin is None:
            return None
        parts = urlsplit(origin)
        if parts.scheme in ("http", "https", "ws", "wss") and parts.netloc:
            default = "443" if parts.scheme in ("https", "wss") else "80"
            theirs = split_host(parts.netloc)
            theirs = (theirs[0], theirs[1] or default)
            ours = split_host(host_header or "")
            if theirs == (ours[0], ours[1] or default):
                return None
        return (
            f"requests from the web page at {origin!r} are refused: this server runs the code it is "
            "sent, so only nnsight clients (which send no cross-site Origin) may use it."
        )

    def key_refusal(self, provided: str | None) -> str | None:
        """Why a request's key is refused, or None to let it in. Never quotes a key."""
        if self.api_key is None:
            return None
        if not provided:
            return (
                "this server requires an API key and the request carried none: set NDIF_API_KEY "
                "(or pass api_key=) to the key the server was started with (it printed where it "
                "wrote a generated key)."
            )
        if not hmac.compare_digest(provided.encode(), self.api_key.encode()):
            return (
                "the API key was refused: it is not the key this server was started with. Set "
                "NDIF_API_KEY (or pass api_key=) to that key (the server printed where it wrote a "
                "generated key)."
            )
        return None


KEY_NAMES = ("key", "token", "secret", "password", "auth")
"""Query parameter names that hint at a credential (`api_key`, `ndif-api-key`, `token`, ...)."""


def key_in_query(query: bytes, api_key: str | None) -> bool:
    """True when a query string carries a credential: a parameter named like one, or the key."""
    from urllib.parse import parse_qsl

    text = query.decode("latin-1")
    if api_key and api_key in text:
        return True
    return any(
        any(hint in name.lower() for hint in KEY_NAMES) for name, _ in parse_qsl(text, keep_blank_values=True)
    )


class Redacted(logging.Filter):
    """Keep credentials out of log lines: query strings are cut from paths, the key replaced.

    uvicorn writes a websocket handshake's path *with* its query string; a key sent there
    (refused, but logged first) would sit in the server's log.
    """

    def __init__(self, api_key: str | None) -> None:
        super().__init__()
        self.api_key = api_key

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(
                a.split("?", 1)[0] + "?<query removed>"
                if isinstance(a, str) and a.startswith("/") and "?" in a
                else a
                for a in record.args
            )
        if self.api_key:
            message = record.getMessage()
            if self.api_key in message:
                record.msg, record.args = message.replace(self.api_key, "<key>"), ()
        return True


def redact_logs(api_key: str | None, loggers: Iterable[str]) -> Redacted:
    """Install `Redacted` on these loggers (uvicorn's and the server's own)."""
    redacted = Redacted(api_key)
    for name in loggers:
        logging.getLogger(name).addFilter(redacted)
    return redacted


class BodyTooLarge(Exception):
    """A request body grew past the limit while it was read."""


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class Guard:
    """ASGI middleware enforcing `Access` and the body limit (module docstring)."""

    def __init__(self, app: Any, access: Access, *, max_body: int) -> None:
        self.app = app
        self.access = access
        self.max_body = max_body

    def refusal(self, scope: Scope) -> tuple[int, str] | None:
        """(status, reason) for a request that may not proceed, else None."""
        if key_in_query(scope.get("query_string", b""), self.access.api_key):
            return 400, (
                "a key was sent in the URL's query string, where logs, proxies and histories keep it; "
                "send it in the ndif-api-key header (nnsight's client and vlmtrace's backend do)."
            )
        host = _header(scope, b"host")
        reason = self.access.host_refusal(host)
        if reason:
            return 403, reason
        reason = self.access.origin_refusal(_header(scope, b"origin"), host)
        if reason:
            return 403, reason
        path = scope.get("path", "")
        if path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
            reason = self.access.key_refusal(_header(scope, b"ndif-api-key"))
            if reason:
                return 401, reason
        if (
            scope["type"] == "http"
            and scope.get("method") == "POST"
            and not _header(scope, b"nnsight-version")
        ):
            return 400, (
                "a request must come from nnsight's client (the nnsight-version header is missing); "
                "use vlmtrace.remote.backend(...) or nnsight's RemoteBackend."
            )
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refused = self.refusal(scope)
        if refused is not None:
            status, reason = refused
            if scope["type"] == "websocket":
                await self._deny_websocket(scope, receive, send, status, reason)
            else:
                await _reply(send, status, reason)
            return
        if scope["type"] == "websocket" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await _reply(send, 413, self._too_large())
            return
        await self._limited(scope, receive, send)

    def _too_large(self) -> str:
        return (
            f"the request body is larger than this server's limit of {self.max_body:,} bytes "
            "(--max-body): send fewer rows per request (a smaller max_batch), or ask the server's "
            "owner to raise --max-body."
        )

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app with a `receive` that stops reading past `max_body` bytes.

        Past the limit the 413 is sent from inside `receive`, before the app's own error
        handling turns the interruption into a 500; whatever the app sends after is dropped.
        """
        seen = 0
        started = refused = False

        async def counting_receive() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    if not started and not refused:
                        refused = True
                        await _reply(send, 413, self._too_large())
                    raise BodyTooLarge
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 is the reply
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge:
            pass

    async def _deny_websocket(
        self, scope: Scope, receive: Receive, send: Send, status: int, reason: str
    ) -> None:
        message = await receive()  # websocket.connect
        if message["type"] != "websocket.connect":
            return
        if "websocket.http.response" in scope.get("extensions", {}):
            body = json.dumps({"detail": reason}).encode()
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})


async def _reply(
    send: Send, status: int, reason: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps({"detail": reason}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
