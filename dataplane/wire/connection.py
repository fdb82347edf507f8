"""Sans-I/O tunnel state machine: bytes in → events out, method calls → bytes to send.

``TunnelConnection`` owns one tunnel's protocol state: the preamble and HELLO exchange,
the flows multiplexed on it (ids, open/half-closed states, per-flow credit in both
directions) and every limit a peer could abuse (frame size, flows, pending OPENs,
credit). It never touches sockets or clocks: the transport feeds it with
``receive_data()`` and writes out ``data_to_send()``. A peer violation raises
``ProtocolError``; the connection then queues a GOAWAY naming the reason (so the peer
can log why) and refuses any further input. Misuse by the local node raises
``FlowError`` with a code the node can turn into an OPEN_FAIL or a log line.

A flow can end at any moment by the peer's doing (its RST, FIN or OPEN_FAIL may cross
anything the node does next), so a flow that is gone is an answer, not an error: frames
that arrive for an ended flow are counted (``late_frames``) and dropped, and the local
calls that name an ended flow do nothing and say so in their result (``send_data`` → 0,
``send_fin``/``send_datagram``/``accept_flow``/``reject_flow`` → False; ``acknowledge``
and ``reset_flow`` are no-ops). The node learns of the end from the flow's own event.
Only an id that never named a flow of this tunnel raises ``FlowError("no_flow")``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import msgspec

from . import events as ev
from .frames import (
    DECODERS,
    HEADER,
    MAX_CONTROL_BODY,
    MAX_FLOW_ID,
    MAX_WINDOW,
    PING_BODY,
    ROLES,
    WINDOW_BODY,
    Auth,
    FrameType,
    GoAway,
    Hello,
    Open,
    OpenFail,
    OpenOk,
    Rst,
    encode_control,
    encode_header,
    encode_ping,
    encode_preamble,
)
from .reader import FrameReader, ProtocolError, check_preamble

__all__ = ["DATAGRAM_PROTOCOLS", "OPEN", "OPENING", "Flow", "FlowCore", "FlowError", "ProtocolError",
           "TunnelConnection", "WireConfig", "check_preamble"]

_DATA = int(FrameType.DATA)
_WINDOW = int(FrameType.WINDOW)
_FIN = FrameType.FIN
_RST = FrameType.RST
_OPEN = FrameType.OPEN
_OPEN_OK = FrameType.OPEN_OK
_OPEN_FAIL = FrameType.OPEN_FAIL
_PING = FrameType.PING
_PONG = FrameType.PONG
_GOAWAY = FrameType.GOAWAY
_HELLO = FrameType.HELLO
_DATAGRAM = FrameType.DATAGRAM
_AUTH = FrameType.AUTH
_FIXED_LENGTH = {_WINDOW: 4, _PING: 8, _PONG: 8, _FIN: 0}
_pack_header = HEADER.pack
_pack_window = WINDOW_BODY.pack
_unpack_window = WINDOW_BODY.unpack_from
_unpack_ping = PING_BODY.unpack_from


class FlowError(Exception):
    """A local request cannot be carried out (limit reached, tunnel draining, unknown flow)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class WireConfig(msgspec.Struct, kw_only=True):
    """What this side announces in HELLO and enforces on the peer."""

    role: str
    node: str
    group: str = ""
    max_frame: int = 262144
    window: int = 524288
    max_flows: int = 16384
    max_pending_opens: int = 1024
    features: list[str] = []
    software: str = ""
    token: str = ""  # sent in HELLO (a client's access token)
    # > 0: each connection makes a random key of this many bytes and sends it in its HELLO (a
    # connector: the key the edge at the other end of that tunnel authenticates flow grants with).
    grant_key_size: int = 0


OPENING = 0
OPEN = 1
# Flows of these protocols carry DATAGRAM frames only: UDP, and private DNS queries (one
# query and its answer, resolved by the connector).
DATAGRAM_PROTOCOLS = frozenset({"udp", "dns"})


class Flow:
    """Per-flow protocol state. ``local`` is True when this side sent the OPEN. ``out`` is the
    list the flow's frames are queued on (None: the transport makes one on demand)."""

    __slots__ = ("id", "local", "state", "send_credit", "recv_credit", "unacked", "sent_fin", "got_fin", "udp",
                 "out")

    def __init__(self, flow_id: int, local: bool, send_credit: int, recv_credit: int, udp: bool = False,
                 out: list[bytes | memoryview] | None = None) -> None:
        self.id = flow_id
        self.udp = udp  # a UDP flow carries DATAGRAM frames only (no DATA, credit or FIN)
        self.local = local
        self.state = OPENING
        self.send_credit = send_credit
        self.recv_credit = recv_credit
        self.unacked = 0
        self.sent_fin = False
        self.got_fin = False
        self.out = out


class FlowCore:
    """What a Ferryman tunnel keeps whatever carries it (a byte stream or QUIC streams).

    The flow table and its ids, the peer's HELLO, GOAWAY state, the local flow API with its
    checks, per-flow credit both ways (``send_data``, ``acknowledge``, ``credit``: written once
    for every transport), and the frames every transport handles alike (``_frame``: WINDOW,
    FIN, RST, OPEN_OK, OPEN_FAIL, HELLO, PING/PONG, GOAWAY, AUTH, DATAGRAM). A subclass says
    where frames go: ``Flow.out`` (the list a flow's frames are queued on, or ``_output(flow)``
    to make one), ``_send_flow`` (a flow's control frame), ``_start_flow`` (a new local flow's
    OPEN), ``_send_control`` (a tunnel-wide frame); ``_forget`` drops a flow that is gone and
    ``_new_flow`` makes a flow's state (its ``out`` is ``_flow_out``).
    """

    def __init__(self, config: WireConfig, dialer: bool) -> None:
        self.config = config
        self.dialer = dialer
        self.peer: Hello | None = None
        self.flows: dict[int, Flow] = {}
        self.goaway_sent = False
        self.goaway_received = False
        # False while the peer does not read what this side sends (the transport says so): a
        # PING is then not answered, since a PONG would only pile up behind the rest; the first
        # PING after the peer reads again is.
        self.answer_pings = True
        self.late_frames = 0
        self.pending_opens = 0
        self._dead: ProtocolError | None = None
        self._initiated = False
        self._next_id = 1 if dialer else 2
        self._peer_last_id = 0  # highest flow id the peer opened
        self._peer_parity = 0 if dialer else 1
        self._ack_threshold = max(1, config.window // 4)
        self._max_frame = config.max_frame
        self._flow_out: list[bytes | memoryview] | None = None  # every flow's output queue (None: one per flow)
        # Called when ``acknowledge`` queues a WINDOW frame (every quarter window of a flow), so the
        # transport can flush it even when nothing else is being sent.
        self.on_window: Callable[[], None] | None = None
        # This connection's grant key (sent in our HELLO; empty: none), fresh for every tunnel.
        self.grant_key = os.urandom(config.grant_key_size) if config.grant_key_size > 0 else b""

    # ------------------------------------------------------------------ where frames go
    def _new_flow(self, flow_id: int, local: bool, request: Open) -> Flow:
        peer = self.peer
        assert peer is not None
        return Flow(flow_id, local, peer.window, self.config.window, request.protocol in DATAGRAM_PROTOCOLS,
                    self._flow_out)

    def _output(self, flow: Flow) -> list[bytes | memoryview]:
        """The list to queue ``flow``'s frames on when ``flow.out`` is None."""
        raise NotImplementedError

    def _send_flow(self, flow_id: int, chunk: bytes | memoryview) -> None:
        raise NotImplementedError

    def _start_flow(self, flow_id: int, chunk: bytes) -> None:
        raise NotImplementedError

    def _send_control(self, chunk: bytes | memoryview) -> None:
        raise NotImplementedError

    def _forget(self, flow_id: int) -> None:
        raise NotImplementedError

    def _remote_open(self, flow_id: int, request: Open, events: list[ev.Event]) -> None:
        """The peer's OPEN: check its id, then ``_admit`` it."""
        raise NotImplementedError

    def _after_hello(self, events: list[ev.Event]) -> None:
        """The peer's HELLO was accepted (a subclass may release what waited for it)."""

    @property
    def dead(self) -> ProtocolError | None:
        return self._dead

    def _hello(self) -> Hello:
        c = self.config
        return Hello(
            role=c.role, node=c.node, max_frame=c.max_frame, window=c.window,
            max_flows=c.max_flows, group=c.group, features=list(c.features), software=c.software, token=c.token,
            grant_key=self.grant_key,
        )

    # ------------------------------------------------------------------ local API
    def open_flow(self, request: Open) -> int:
        peer = self._require_peer()
        if self.goaway_received:
            raise FlowError("draining", f"peer {peer.node} is draining (GOAWAY); no new flows")
        if self.goaway_sent:
            raise FlowError("draining", "this tunnel is draining; no new flows")
        if len(self.flows) >= peer.max_flows:
            raise FlowError("too_many_flows", f"peer {peer.node} allows at most {peer.max_flows} flows per tunnel")
        flow_id = self._next_id
        if flow_id > MAX_FLOW_ID:
            raise FlowError("flow_ids_exhausted", "flow ids exhausted on this tunnel")
        self._next_id = flow_id + 2
        self.flows[flow_id] = self._new_flow(flow_id, True, request)
        self._start_flow(flow_id, encode_control(flow_id, request))
        return flow_id

    def accept_flow(self, flow_id: int, bound: str = "", remote: str = "") -> bool:
        """OPEN_OK for the peer's OPEN; False when the peer already cancelled it (RST)."""
        flow = self._remote_opening(flow_id)
        if flow is None:
            return False
        flow.state = OPEN
        self.pending_opens -= 1
        self._send_flow(flow_id, encode_control(flow_id, OpenOk(bound=bound, remote=remote)))
        return True

    def reject_flow(self, flow_id: int, code: str, reason: str) -> bool:
        """OPEN_FAIL for the peer's OPEN; False when the peer already cancelled it (RST)."""
        if self._remote_opening(flow_id) is None:
            return False
        self.pending_opens -= 1
        self._send_flow(flow_id, encode_control(flow_id, OpenFail(code=code, reason=reason[:1024])))
        self._forget(flow_id)
        return True

    def credit(self, flow_id: int) -> int:
        """Bytes ``send_data`` may send on the flow now."""
        flow = self.flows.get(flow_id)
        return flow.send_credit if flow is not None else 0

    def send_data(self, flow_id: int, data: bytes | memoryview) -> int:
        """Queue as much of ``data`` as the flow's credit allows; returns the bytes taken (0 as
        well when the flow is gone)."""
        flow = self.flows.get(flow_id)
        if flow is None:
            self._gone(flow_id)
            return 0
        if flow.state != OPEN or flow.sent_fin or flow.udp:
            raise FlowError("flow_state", f"flow {flow_id} cannot send data now")
        size = len(data)
        n = size if size <= flow.send_credit else flow.send_credit
        if n <= 0:
            return 0
        flow.send_credit -= n
        out = flow.out
        if out is None:
            out = self._output(flow)
        max_frame = self.peer.max_frame  # type: ignore[union-attr]
        if n <= max_frame:
            out.append(_pack_header(_DATA, 0, flow_id, n))
            out.append(data if n == size else memoryview(data)[:n])
            return n
        view = memoryview(data)
        for start in range(0, n, max_frame):
            chunk = view[start:min(start + max_frame, n)]
            out.append(_pack_header(_DATA, 0, flow_id, len(chunk)))
            out.append(chunk)
        return n

    def acknowledge(self, flow_id: int, size: int) -> bool:
        """Tell the connection ``size`` received bytes were consumed; grants credit back.
        Returns whether a WINDOW frame was queued (credit goes back in steps of a quarter window)."""
        flow = self.flows.get(flow_id)
        if flow is None or flow.got_fin:
            return False
        unacked = flow.unacked + size
        if unacked >= self._ack_threshold:
            flow.recv_credit += unacked
            flow.unacked = 0
            out = flow.out
            if out is None:
                out = self._output(flow)
            out.append(_pack_header(_WINDOW, 0, flow_id, 4) + _pack_window(unacked))
            if self.on_window is not None:
                self.on_window()
            return True
        flow.unacked = unacked
        return False

    def send_fin(self, flow_id: int) -> bool:
        """Half-close our direction. Returns True when the flow is now fully closed (False too
        when the flow is already gone: its own end event says how it ended)."""
        flow = self.flows.get(flow_id)
        if flow is None:
            self._gone(flow_id)
            return False
        if flow.state != OPEN or flow.sent_fin or flow.udp:
            raise FlowError("flow_state", f"flow {flow_id} cannot be half-closed now")
        flow.sent_fin = True
        self._send_flow(flow_id, encode_header(_FIN, flow_id, 0))
        if flow.got_fin:
            self._forget(flow_id)
            return True
        return False

    def reset_flow(self, flow_id: int, code: str, reason: str = "") -> None:
        """Abort a flow in both directions. A flow that is already gone is ignored."""
        flow = self.flows.get(flow_id)
        if flow is None:
            return
        if not flow.local and flow.state == OPENING:
            self.pending_opens -= 1
        self._send_flow(flow_id, encode_control(flow_id, Rst(code=code, reason=reason[:1024])))
        self._forget(flow_id)

    def _datagram_flow(self, flow_id: int) -> Flow | None:
        """The open UDP flow a local datagram is for (None: it is gone; FlowError: not a UDP flow)."""
        flow = self.flows.get(flow_id)
        if flow is None:
            self._gone(flow_id)
            return None
        if not flow.udp or flow.state != OPEN:
            raise FlowError("flow_state", f"flow {flow_id} cannot carry a datagram now")
        return flow

    def ping(self, value: float) -> None:
        self._send_control(encode_ping(_PING, value))

    def send_auth(self, token: str) -> None:
        """Queue an AUTH frame carrying a new access token (after HELLO)."""
        self._require_peer()
        self._send_control(encode_control(0, Auth(token=token)))

    def goaway(self, code: str, reason: str = "") -> None:
        if not self.goaway_sent:
            self.goaway_sent = True
            self._send_control(encode_control(0, GoAway(code=code, reason=reason[:1024])))

    # ------------------------------------------------------------------ input
    def _data_start(self, flow_id: int, length: int) -> bool:
        """Check a DATA header against the flow's state and credit; False for a late frame and for
        an empty one (it carries nothing, costs no credit, and must not cost its receiver anything
        either: a peer could send them without end)."""
        flow = self.flows.get(flow_id)
        if flow is None:
            self._late_frame(flow_id, "DATA")
            return False
        if flow.state != OPEN or flow.got_fin or flow.udp:
            raise ProtocolError(
                "stream_state",
                f"DATA on flow {flow_id} "
                f"{'after FIN' if flow.got_fin else 'of a UDP flow' if flow.udp else 'before OPEN_OK'}",
            )
        if length > flow.recv_credit:
            raise ProtocolError(
                "flow_control",
                f"flow {flow_id}: peer sent {length} bytes with only {flow.recv_credit} bytes of credit",
            )
        flow.recv_credit -= length
        return length > 0

    def _frame(self, ftype: int, flow_id: int, payload: memoryview, events: list[ev.Event]) -> None:
        """A frame other than DATA (QUIC: one its stream may carry; OPEN only on a byte stream)."""
        if ftype == _WINDOW:
            (increment,) = _unpack_window(payload, 0)
            if flow_id == 0 or increment == 0:
                raise ProtocolError("bad_frame", f"WINDOW with flow {flow_id} increment {increment}")
            flow = self.flows.get(flow_id)
            if flow is None:
                self._late_frame(flow_id, "WINDOW")
                return
            credit = flow.send_credit + increment
            if credit > MAX_WINDOW:
                raise ProtocolError("flow_control", f"flow {flow_id}: credit overflow ({credit} bytes)")
            flow.send_credit = credit
            events.append(ev.CreditAvailable(flow_id, credit))
            return
        if self.peer is None:
            if ftype != _HELLO:
                raise ProtocolError("hello_required", f"{FrameType(ftype).name} frame before HELLO")
            hello = DECODERS[_HELLO].decode(payload)
            if hello.role not in ROLES:
                raise ProtocolError("bad_hello", f"unknown role {hello.role!r} in HELLO")
            if hello.max_frame < 1024:
                raise ProtocolError("bad_hello", f"peer max_frame {hello.max_frame} is below 1024")
            self.peer = hello
            events.append(ev.HelloReceived(hello))
            self._after_hello(events)
            return
        if ftype == _OPEN:
            self._remote_open(flow_id, DECODERS[_OPEN].decode(payload), events)
        elif ftype == _FIN:
            flow = self.flows.get(flow_id)
            if flow is None:
                self._late_frame(flow_id, "FIN")
                return
            if flow.state != OPEN or flow.got_fin or flow.udp:
                raise ProtocolError("stream_state", f"unexpected FIN on flow {flow_id}")
            flow.got_fin = True
            events.append(ev.FlowEnded(flow_id))
            if flow.sent_fin:
                self._forget(flow_id)
                events.append(ev.FlowClosed(flow_id))
        elif ftype == _RST:
            body = DECODERS[_RST].decode(payload)
            flow = self.flows.get(flow_id)
            if flow is None:
                self._late_frame(flow_id, "RST")
                return
            if not flow.local and flow.state == OPENING:
                self.pending_opens -= 1
            self._forget(flow_id)
            events.append(ev.FlowReset(flow_id, body.code, body.reason))
        elif ftype == _OPEN_OK:
            body = DECODERS[_OPEN_OK].decode(payload)
            flow = self._local_opening(flow_id, "OPEN_OK")
            if flow is not None:
                flow.state = OPEN
                events.append(ev.FlowAccepted(flow_id, body.bound, body.remote))
        elif ftype == _OPEN_FAIL:
            body = DECODERS[_OPEN_FAIL].decode(payload)
            if self._local_opening(flow_id, "OPEN_FAIL") is not None:
                self._forget(flow_id)
                events.append(ev.FlowRejected(flow_id, body.code, body.reason))
        elif ftype == _PING:
            if self.answer_pings:
                self._send_control(encode_header(_PONG, 0, 8) + bytes(payload))
        elif ftype == _PONG:
            events.append(ev.PongReceived(_unpack_ping(payload, 0)[0]))
        elif ftype == _GOAWAY:
            body = DECODERS[_GOAWAY].decode(payload)
            if not self.goaway_received:  # one is news; more (a peer sends at most one) are dropped
                self.goaway_received = True
                events.append(ev.GoAwayReceived(body.code, body.reason))
        elif ftype == _DATAGRAM:
            flow = self.flows.get(flow_id)
            if flow is None:
                self._late(flow_id, "DATAGRAM")
                return
            if not flow.udp or flow.state != OPEN:
                raise ProtocolError("stream_state", f"DATAGRAM on flow {flow_id} "
                                                    f"{'before OPEN_OK' if flow.udp else 'of a TCP flow'}")
            events.append(ev.DatagramReceived(flow_id, payload))
        elif ftype == _AUTH:
            events.append(ev.AuthReceived(DECODERS[_AUTH].decode(payload).token))
        elif ftype == _HELLO:
            raise ProtocolError("bad_hello", "second HELLO on the same tunnel")

    def _admit(self, flow_id: int, request: Open, events: list[ev.Event]) -> None:
        """The peer's OPEN with a valid id: take the flow, or refuse it with OPEN_FAIL."""
        if self.goaway_sent:
            code, reason = "draining", f"{self.config.role} {self.config.node} is draining"
        elif len(self.flows) >= self.config.max_flows:
            code, reason = "too_many_flows", f"at most {self.config.max_flows} flows per tunnel"
        elif self.pending_opens >= self.config.max_pending_opens:
            code, reason = "too_many_pending", f"at most {self.config.max_pending_opens} pending OPENs per tunnel"
        else:
            self.flows[flow_id] = self._new_flow(flow_id, False, request)
            self.pending_opens += 1
            events.append(ev.FlowRequested(flow_id, request))
            return
        self._send_flow(flow_id, encode_control(flow_id, OpenFail(code=code, reason=reason)))
        self._forget(flow_id)
        events.append(ev.OpenRefused(flow_id, code, reason))

    def _local_opening(self, flow_id: int, what: str) -> Flow | None:
        flow = self.flows.get(flow_id)
        if flow is None:
            self._late_frame(flow_id, what)
            return None
        if not flow.local or flow.state != OPENING:
            raise ProtocolError("stream_state", f"unexpected {what} on flow {flow_id}")
        return flow

    def _remote_opening(self, flow_id: int) -> Flow | None:
        """The peer's flow awaiting our answer; None when it is gone (the peer cancelled it)."""
        flow = self.flows.get(flow_id)
        if flow is None and flow_id % 2 == self._peer_parity and self._was_flow(flow_id):
            return None
        if flow is None or flow.local or flow.state != OPENING:
            raise FlowError("flow_state", f"flow {flow_id} is not awaiting an answer")
        return flow

    def _late(self, flow_id: int, what: str) -> None:
        """A frame for a flow that is gone: fine if it existed (a race with RST), else fatal."""
        if not self._was_flow(flow_id):
            raise ProtocolError("unknown_flow", f"{what} for flow {flow_id}, which was never opened")
        self.late_frames += 1

    def _was_flow(self, flow_id: int) -> bool:
        """Whether ``flow_id`` named a flow of this tunnel at some point (opened by either side)."""
        ours = flow_id % 2 != self._peer_parity
        return flow_id != 0 and (flow_id < self._next_id if ours else flow_id <= self._peer_last_id)

    def _gone(self, flow_id: int) -> None:
        """A local call named a flow that is not in the table: fine if it ended (its end crossed
        the call; the caller gets the "flow gone" result), a node bug if it never existed."""
        if not self._was_flow(flow_id):
            raise FlowError("no_flow", f"flow {flow_id} does not exist")

    def _require_peer(self) -> Hello:
        if self.peer is None:
            raise FlowError("not_ready", "tunnel handshake (HELLO) has not completed")
        return self.peer

    _late_frame = _late  # a frame of a flow stream that is gone (QUIC: judged by its stream)


class TunnelConnection(FlowCore, FrameReader):
    """A Ferryman tunnel over one byte stream (TLS over TCP): every frame in one output queue,
    every input through one ``FrameReader``."""

    def __init__(self, config: WireConfig, *, dialer: bool) -> None:
        super().__init__(config, dialer)
        self._out: list[bytes | memoryview] = []
        self._flow_out = self._out  # one byte stream: every frame in one queue
        self._reader_init(preamble=True)

    # ------------------------------------------------------------------ output
    def initiate(self) -> None:
        """Queue the preamble and our HELLO; call once when the byte stream is up."""
        self._initiated = True
        self._out.append(encode_preamble() + encode_control(0, self._hello()))

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        if len(out) == 1:
            data = out[0]
            out.clear()
            return data if isinstance(data, bytes) else bytes(data)
        data = b"".join(out)
        out.clear()
        return data

    def chunks_to_send(self, large: int = 16384) -> list[bytes | memoryview]:
        """What ``data_to_send`` would return, as a list: runs of pieces smaller than ``large``
        joined, larger pieces (DATA payloads) as they are, so that they are not copied once more
        on their way to a transport that takes a list (``writelines``)."""
        out = self._out  # (every flow queues on this very list: emptied in place)
        if not out:
            return []
        pieces = out[:]
        out.clear()
        chunks: list[bytes | memoryview] = []
        run: list[bytes | memoryview] = []
        for piece in pieces:
            if len(piece) < large:
                run.append(piece)
                continue
            if run:
                chunks.append(run[0] if len(run) == 1 else b"".join(run))
                run = []
            chunks.append(piece)
        if run:
            chunks.append(run[0] if len(run) == 1 else b"".join(run))
        return chunks

    @property
    def has_output(self) -> bool:
        return bool(self._out)

    def send_datagram(self, flow_id: int, data: bytes | memoryview) -> bool:
        """Queue one datagram of an open UDP flow (whole: a datagram is never split); False when
        the flow is gone."""
        if self._datagram_flow(flow_id) is None:
            return False
        if len(data) > self.peer.max_frame:  # type: ignore[union-attr]
            raise FlowError("datagram_too_large", f"datagram of {len(data)} bytes exceeds the tunnel's maximum "
                                                  f"of {self.peer.max_frame}")  # type: ignore[union-attr]
        self._out.append(encode_header(_DATAGRAM, flow_id, len(data)))
        self._out.append(data)
        return True

    # ------------------------------------------------------------------ where frames go
    def _send_flow(self, flow_id: int, chunk: bytes | memoryview) -> None:
        self._out.append(chunk)

    _start_flow = _send_flow

    def _send_control(self, chunk: bytes | memoryview) -> None:
        self._out.append(chunk)

    def _forget(self, flow_id: int) -> None:
        self.flows.pop(flow_id, None)

    # ------------------------------------------------------------------ input
    def receive_data(self, data: bytes) -> list[ev.Event]:
        """Parse bytes from the peer. Raises ProtocolError on any violation."""
        if self._dead is not None:
            raise self._dead
        events: list[ev.Event] = []
        try:
            self._read(data, events)
        except ProtocolError as exc:
            self._fail(exc)
            raise
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            err = ProtocolError("bad_frame", f"undecodable control frame: {exc}")
            self._fail(err)
            raise err from None
        return events

    def _fail(self, exc: ProtocolError) -> None:
        self._dead = exc
        self._buf = bytearray()
        if not self._initiated:
            self._out.append(encode_preamble())
        self._out.append(encode_control(0, GoAway(code=exc.code, reason=exc.message[:1024])))

    def _check_header(self, ftype: int, flow_id: int, length: int) -> None:
        if ftype == _DATA or ftype == _DATAGRAM:
            if length > self._max_frame:
                raise ProtocolError(
                    "frame_too_large", f"frame of {length} bytes exceeds the maximum of {self._max_frame}"
                )
        elif ftype in _FIXED_LENGTH:
            if length != _FIXED_LENGTH[ftype]:
                raise ProtocolError("bad_frame", f"{FrameType(ftype).name} frame with length {length}")
        elif ftype in DECODERS:
            if length > MAX_CONTROL_BODY:
                raise ProtocolError(
                    "frame_too_large",
                    f"{FrameType(ftype).name} body of {length} bytes exceeds {MAX_CONTROL_BODY}",
                )
        else:
            raise ProtocolError("unknown_frame", f"unknown frame type {ftype}")

    def _remote_open(self, flow_id: int, request: Open, events: list[ev.Event]) -> None:
        if flow_id % 2 != self._peer_parity or flow_id <= self._peer_last_id:
            raise ProtocolError(
                "bad_flow_id", f"OPEN with flow id {flow_id} (ids must be new and {'odd' if self._peer_parity else 'even'})"
            )
        self._peer_last_id = flow_id
        self._admit(flow_id, request, events)
