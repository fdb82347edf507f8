"""Target ``proxy``: an egress proxy's answer to CONNECT, as a node dialing its edge through an HTTP
proxy reads it (``dataplane.transport.proxy._connect_exchange``).

The answer comes over a real socket pair, in writes of fuzzed sizes, then the proxy closes.
Contract: the exchange either returns (a 2xx answer with nothing after it: the tunnel may start)
or raises ``ProxyError`` with a one-line, printable, bounded message — never another exception,
never a wait once the proxy has closed, never more than ``MAX_RESPONSE_HEAD`` (+ one read) taken in.
"""

from __future__ import annotations

import asyncio
import re
import socket

from dataplane.transport import proxy as egress

from . import Finding, Reader

PROXIES = [egress.EgressProxy.parse("http://proxy.example:3128"),
           egress.EgressProxy.parse("http://user:secret@proxy.example:3128")]
_loop = asyncio.new_event_loop()
_SUCCESS = re.compile(rb"(HTTP/\d\.\d 1\d\d[^\r\n]*\r?\n(?:[^\r\n]+\r?\n)*\r?\n)*HTTP/\d\.\d 2\d\d")


async def _exchange(answer: list[bytes], which: int) -> BaseException | None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    progress = [0]

    async def proxy_side() -> None:
        try:
            await loop.sock_recv(theirs, 65536)  # the CONNECT request
            for chunk in answer:
                await loop.sock_sendall(theirs, chunk)
        except OSError:
            pass  # the node stopped reading (it refused the answer) and closed
        finally:
            theirs.close()

    peer = loop.create_task(proxy_side())
    try:
        async with asyncio.timeout(10):
            await egress._connect_exchange(ours, PROXIES[which], "edge.example", 443, progress)
        result: BaseException | None = None
    except egress.ProxyError as exc:
        result = exc
    except TimeoutError:
        raise Finding("the exchange still waited after the proxy closed") from None
    finally:
        ours.close()
        await peer
    if progress[0] > egress.MAX_RESPONSE_HEAD + 4096:
        raise Finding(f"{progress[0]} bytes of answer taken in")
    return result


def one_input(data: bytes) -> None:
    r = Reader(data)
    which = r.byte() & 1
    splits = r.take(r.byte() % 16)
    answer = r.rest()
    result = _loop.run_until_complete(_exchange(Reader(splits).chunks(answer), which))
    if result is not None:
        message = str(result)
        if len(message) > 2000 or not message.isprintable():
            raise Finding(f"ProxyError message not a bounded printable line: {message[:300]!r}")
    elif not _SUCCESS.match(answer):
        raise Finding(f"exchange accepted {answer[:40]!r}")
