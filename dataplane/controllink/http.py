"""The one HTTP client for every call of a node to the control plane: asyncio HTTP/1.1 on ``h11``.

Configuration long-polls, heartbeats, renewal, traffic shipping (``link.py``), registration
(``registration.py``), the client's sign-in, refresh and sign-out, its forwarding profile
long-poll and OIDC login polling all go through ``request``. One request per connection
(``Connection: close``): nodes make a long-poll every few tens of seconds and a heartbeat
every half minute, so connection reuse would save nothing worth its state. It is a
coroutine, so a node's shutdown cancels a waiting long-poll at once (a request in a worker
thread could not be interrupted); command-line callers (``register``, ``login``,
``logout``, the local fabric) use ``request_blocking``, which runs it on an event loop of its
own in a worker thread. The body of
an answer is bounded (``max_body``), a whole request by ``timeout``, and every failure is an
``HttpError`` saying what went wrong (refused, name not resolved, TLS, timeout, ...).
A verified TLS connection whose certificate names a node role (an edge's: same CA, maybe the
same host name) is refused like a certificate that does not verify
(``controltls.refuse_node_certificate``).

Several control-plane nodes: ``base`` may name several base URLs, comma-separated
(``bases``). A request goes to the one that answered last (at first the first one); when
it cannot be reached (no connection: refused, unreachable, name not resolved, TLS failure,
such as a certificate that does not chain to the pinned CA, connect timeout) the next is tried at once, within the same ``timeout``. A request that
fails after it was sent (the node died mid-answer) is not sent again (it may have taken
effect): the error goes to the caller, and the caller's next request starts at the next URL.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import signal
import threading
import urllib.parse
from typing import Any

import h11

from ..basics.controltls import ControlTlsError, control_urls, refuse_node_certificate


_default_tls: ssl.SSLContext | None = None


def default_tls() -> ssl.SSLContext:
    """The system-trust TLS context for https:// URLs, made once (building one costs ~30 ms)."""
    global _default_tls
    if _default_tls is None:
        _default_tls = ssl.create_default_context()
    return _default_tls


class HttpError(Exception):
    """No usable HTTP answer: connection failed, timed out, or the peer broke the protocol."""


class _NotConnected(HttpError):
    """No connection was made: nothing was sent, so another control-plane node may be tried."""


CONNECT_TIMEOUT = 5.0  # seconds to connect to one control-plane URL when others remain to try
JOIN_STEP = 0.1  # seconds a command-line call waits on its request thread between looks at signals
WRITE_PIECE = 256 * 1024  # bytes of a request body written before the event loop may run other work
_preferred: dict[str, int] = {}  # a comma-separated base -> the index of the URL that answered last


def bases(base: str) -> list[str]:
    """The base URLs of ``base`` (one, or several comma-separated), without trailing slashes."""
    return control_urls(base)


class HttpResponse:
    """``status``, ``headers`` (names lower-cased) and the whole ``body`` of an answer."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def split_base(base: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path prefix) of ``http(s)://host[:port][/prefix]``."""
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{base!r} is not an http:// or https:// URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


async def request(base: str, method: str, target: str, *, headers: dict[str, str] | None = None,
                  body: bytes | None = None, timeout: float = 30.0, max_body: int = 1 << 20,
                  ssl_context: ssl.SSLContext | None = None, user_agent: str = "ferryman") -> HttpResponse:
    """``method`` ``base + target`` and the whole answer; ``HttpError`` when none came. ``base``
    may list several control-plane URLs (module doc)."""
    urls = bases(base)
    if len(urls) <= 1:
        return await _request_one(urls[0] if urls else base, method, target, headers=headers, body=body,
                                  timeout=timeout, max_body=max_body, ssl_context=ssl_context,
                                  user_agent=user_agent)
    start = _preferred.get(base, 0) % len(urls)
    order = [(start + i) % len(urls) for i in range(len(urls))]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    failures: list[str] = []
    for position, index in enumerate(order):
        left = deadline - loop.time()
        if left <= 0:
            break
        last = position == len(order) - 1
        try:
            answer = await _request_one(urls[index], method, target, headers=headers, body=body, timeout=left,
                                        max_body=max_body, ssl_context=ssl_context, user_agent=user_agent,
                                        connect_timeout=None if last else min(CONNECT_TIMEOUT, left))
        except _NotConnected as exc:
            failures.append(str(exc))
            continue
        except HttpError:
            _preferred[base] = (index + 1) % len(urls)  # the next request tries another node first
            raise
        _preferred[base] = index
        return answer
    raise HttpError("no control-plane node answered: " + "; ".join(failures or [f"no time left ({timeout:g}s)"]))


async def _request_one(base: str, method: str, target: str, *, headers: dict[str, str] | None,
                       body: bytes | None, timeout: float, max_body: int, ssl_context: ssl.SSLContext | None,
                       user_agent: str, connect_timeout: float | None = None) -> HttpResponse:
    try:
        scheme, host, port, prefix = split_base(base)
    except ValueError as exc:
        raise HttpError(str(exc)) from None
    context = ssl_context if ssl_context is not None else (default_tls() if scheme == "https" else None)
    netloc = host if ":" not in host else f"[{host}]"
    default_port = 443 if scheme == "https" else 80
    fields = [("Host", netloc if port == default_port else f"{netloc}:{port}"), ("User-Agent", user_agent),
              ("Connection", "close"), *((headers or {}).items())]
    if body is not None:
        fields.append(("Content-Length", str(len(body))))
    conn = h11.Connection(h11.CLIENT)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            try:
                async with asyncio.timeout(connect_timeout):
                    reader, writer = await asyncio.open_connection(host, port, ssl=context,
                                                                   server_hostname=host if context else None)
            except ssl.SSLCertVerificationError as exc:
                raise _NotConnected(f"TLS with {host}:{port} failed: the certificate is not trusted "
                                    f"({exc.verify_message or exc.reason})") from None
            except ssl.SSLError as exc:
                raise _NotConnected(f"TLS with {host}:{port} failed: {exc.reason or exc}") from None
            except socket.gaierror as exc:
                raise _NotConnected(f"cannot connect to {host}:{port}: host name not resolved "
                                    f"({exc.strerror})") from None
            except ConnectionRefusedError:
                raise _NotConnected(f"cannot connect to {host}:{port}: Connection refused") from None
            except OSError as exc:
                raise _NotConnected(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
            except TimeoutError:
                if connect_timeout is None:
                    raise
                raise _NotConnected(f"cannot connect to {host}:{port}: no connection within "
                                    f"{connect_timeout:g}s") from None
            if context is not None and context.verify_mode == ssl.CERT_REQUIRED:
                try:
                    refuse_node_certificate(writer.get_extra_info("peercert"), f"{host}:{port}")
                except ControlTlsError as exc:  # nothing was sent: another control-plane node may be tried
                    raise _NotConnected(str(exc)) from None
            writer.write(conn.send(h11.Request(method=method, target=prefix + target or "/", headers=fields)))
            if body:  # a large body in pieces, letting the event loop run between them (TLS encrypts each)
                view = memoryview(body)
                for at in range(0, len(body), WRITE_PIECE):
                    if at:
                        await writer.drain()
                        await asyncio.sleep(0)
                    writer.write(conn.send(h11.Data(data=view[at:at + WRITE_PIECE])))
            writer.write(conn.send(h11.EndOfMessage()))
            status, answer_headers, chunks, size = 0, {}, [], 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    if not data and not status:
                        raise HttpError(f"{host}:{port} closed the connection without an answer")
                    conn.receive_data(data)  # b"" marks the end of the stream
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                    answer_headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > max_body:
                        raise HttpError(f"the answer from {host}:{port} is larger than {max_body} bytes")
                    chunks.append(bytes(event.data))
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
            return HttpResponse(status, answer_headers, b"".join(chunks))
    except TimeoutError:
        raise HttpError(f"no answer from {host}:{port} within {timeout:g}s") from None
    except h11.ProtocolError as exc:
        raise HttpError(f"{host}:{port} broke HTTP/1.1: {exc}") from None
    except (ConnectionError, OSError) as exc:
        raise HttpError(f"connection to {host}:{port} failed: {exc.strerror or exc}") from None
    finally:
        if writer is not None:
            writer.close()


def request_blocking(base: str, method: str, target: str, **options: Any) -> HttpResponse:
    """``request`` for code that is not a coroutine (command-line calls). It runs on an event loop
    of its own in a worker thread, so the caller's thread waits interruptibly: Ctrl-C stops the
    command at once (KeyboardInterrupt here), and the abandoned request cannot keep the process
    alive (the thread is a daemon)."""
    outcome: list[HttpResponse | BaseException] = []

    def run() -> None:
        block_stop_signals()
        try:
            outcome.append(asyncio.run(request(base, method, target, **options)))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome.append(exc)

    worker = threading.Thread(target=run, name="ferryman-http", daemon=True)
    worker.start()
    # Joined in short steps: a signal the kernel hands to another thread (before that thread
    # blocked it) only sets a flag, and an untimed join would not look at it until the request
    # ended (a long poll: half a minute).
    while worker.is_alive():
        worker.join(JOIN_STEP)
    answer = outcome[0]
    if isinstance(answer, BaseException):
        raise answer
    return answer


def block_stop_signals() -> None:
    """Keep SIGINT and SIGTERM away from the calling (worker) thread, so the kernel delivers them
    to the main thread, where Python raises KeyboardInterrupt or runs the handler at once."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
