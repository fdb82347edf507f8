"""Events that ``TunnelConnection.receive_data`` returns: what the peer did, one object each."""

from __future__ import annotations

from .frames import Hello, Open


class Event:
    __slots__ = ()

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__
        )


class HelloReceived(Event):
    """The peer introduced itself; flows may be opened from now on."""

    __slots__ = ("hello",)

    def __init__(self, hello: Hello) -> None:
        self.hello = hello


class FlowRequested(Event):
    """The peer asks us to open a flow; answer with accept_flow or reject_flow."""

    __slots__ = ("flow_id", "open")

    def __init__(self, flow_id: int, open: Open) -> None:
        self.flow_id = flow_id
        self.open = open


class OpenRefused(Event):
    """We refused a peer OPEN on our own (limits, draining); already answered with OPEN_FAIL."""

    __slots__ = ("flow_id", "code", "reason")

    def __init__(self, flow_id: int, code: str, reason: str) -> None:
        self.flow_id = flow_id
        self.code = code
        self.reason = reason


class FlowAccepted(Event):
    """The peer answered our OPEN with OPEN_OK."""

    __slots__ = ("flow_id", "bound", "remote")

    def __init__(self, flow_id: int, bound: str, remote: str = "") -> None:
        self.flow_id = flow_id
        self.bound = bound
        self.remote = remote


class FlowRejected(Event):
    """The peer answered our OPEN with OPEN_FAIL; the flow is gone."""

    __slots__ = ("flow_id", "code", "reason")

    def __init__(self, flow_id: int, code: str, reason: str) -> None:
        self.flow_id = flow_id
        self.code = code
        self.reason = reason


class DataReceived(Event):
    """Payload for a flow. ``data`` is a read-only slice; call acknowledge() once consumed."""

    __slots__ = ("flow_id", "data")

    def __init__(self, flow_id: int, data: memoryview | bytes) -> None:
        self.flow_id = flow_id
        self.data = data


class FlowEnded(Event):
    """The peer half-closed the flow (FIN): no more data will come from it."""

    __slots__ = ("flow_id",)

    def __init__(self, flow_id: int) -> None:
        self.flow_id = flow_id


class FlowReset(Event):
    """The peer aborted the flow (RST); the flow is gone."""

    __slots__ = ("flow_id", "code", "reason")

    def __init__(self, flow_id: int, code: str, reason: str) -> None:
        self.flow_id = flow_id
        self.code = code
        self.reason = reason


class FlowClosed(Event):
    """Both directions finished cleanly (FIN sent and received); the flow is gone."""

    __slots__ = ("flow_id",)

    def __init__(self, flow_id: int) -> None:
        self.flow_id = flow_id


class CreditAvailable(Event):
    """The peer granted more credit for a flow; pending data can be sent."""

    __slots__ = ("flow_id", "credit")

    def __init__(self, flow_id: int, credit: int) -> None:
        self.flow_id = flow_id
        self.credit = credit


class DatagramReceived(Event):
    __slots__ = ("flow_id", "data")

    def __init__(self, flow_id: int, data: memoryview | bytes) -> None:
        self.flow_id = flow_id
        self.data = data


class PongReceived(Event):
    """Answer to our PING; ``sent_at`` is the value we put in it (for RTT)."""

    __slots__ = ("sent_at",)

    def __init__(self, sent_at: float) -> None:
        self.sent_at = sent_at


class GoAwayReceived(Event):
    """The peer drains: no new flows on this tunnel; existing ones continue."""

    __slots__ = ("code", "reason")

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason


class AuthReceived(Event):
    """The peer (a client) sent a new access token."""

    __slots__ = ("token",)

    def __init__(self, token: str) -> None:
        self.token = token
