"""The frame reader: Ferryman frames out of a byte stream, for every transport.

A TLS/TCP tunnel is one byte stream (preamble, then frames); a QUIC tunnel is several (the
control stream, with the preamble, and one stream per flow). ``FrameReader._read`` parses
any of them: it checks each header as soon as it is complete (``_check_header``), hands a
DATA payload on as slices of the bytes it was given, as they arrive (a payload split over
reads is never reassembled), buffers only an incomplete header or control body, and passes
every other frame whole to ``_frame``. What a frame may be on this stream and what it means
is the owner's: a subclass (the byte-stream ``TunnelConnection``, or a QUIC stream) provides

- ``_check_header(ftype, flow_id, length)``: raise ``ProtocolError`` for a frame type, flow or
  length this stream must not carry;
- ``_data_start(flow_id, length)``: a DATA header was read: check it against its flow (state,
  credit; ``ProtocolError``) and say whether its payload is delivered (False: a frame of a flow
  that is gone, or nothing to deliver);
- ``_frame(ftype, flow_id, payload, events)``: any other whole frame;

and ``flows`` (whose ids are still open). Nothing here does I/O.
"""

from __future__ import annotations

from . import events as ev
from .frames import HEADER, HEADER_SIZE, MAGIC, PREAMBLE, PREAMBLE_SIZE, VERSION, FrameType

_DATA = int(FrameType.DATA)
_unpack_header = HEADER.unpack_from
_DataReceived = ev.DataReceived


class ProtocolError(Exception):
    """The peer broke the protocol; the tunnel must be closed. ``code`` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_preamble(data: bytes | bytearray, pos: int) -> None:
    """Check the peer's preamble at ``pos`` (magic and protocol version)."""
    magic, version = PREAMBLE.unpack_from(data, pos)
    if magic != MAGIC:
        raise ProtocolError("bad_preamble", "not a Ferryman tunnel: bad magic in preamble")
    if version != VERSION:
        raise ProtocolError(
            "unsupported_version",
            f"peer speaks protocol version {version}; this node speaks version {VERSION}",
        )


class FrameReader:
    """Parse state of one byte stream and the loop that reads it (see the module docstring)."""

    flows: dict[int, object]
    _buf: bytearray  # an incomplete header or control body (or preamble)
    _stream_left: int  # bytes still to come of a DATA payload whose header was read
    _stream_flow: int  # ... and its flow (0: drop them, the flow is gone)
    _need_preamble: bool  # the stream starts with the peer's preamble, not read yet

    def _reader_init(self, preamble: bool) -> None:
        self._buf = bytearray()
        self._stream_left = 0
        self._stream_flow = 0
        self._need_preamble = preamble

    # provided by the owner of the stream
    def _check_header(self, ftype: int, flow_id: int, length: int) -> None:
        raise NotImplementedError

    def _data_start(self, flow_id: int, length: int) -> bool:
        raise NotImplementedError

    def _frame(self, ftype: int, flow_id: int, payload: memoryview, events: list[ev.Event]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ the loop
    def _read(self, data: bytes, events: list[ev.Event]) -> None:
        """Parse ``data``, the next bytes of the stream, into ``events``."""
        n = len(data)
        pos = 0
        view = memoryview(data)
        if self._stream_left:
            # The rest of a DATA payload whose header came in an earlier chunk: deliver as is.
            pos = self._stream_take(view, 0, n, events)
            if self._stream_left:
                return
        buf = self._buf
        if buf:
            # Finish the unit that the previous chunk left incomplete, then parse in place.
            while True:
                need = self._wanted(buf)
                if len(buf) < need:
                    if len(buf) >= HEADER_SIZE and buf[0] == _DATA:
                        # A DATA header is complete: stream its payload instead of buffering it.
                        _t, _f, flow_id, length = _unpack_header(buf, 0)
                        buf.clear()
                        self._stream_flow = flow_id if self._data_start(flow_id, length) else 0
                        self._stream_left = length
                        pos = self._stream_take(view, pos, n, events)
                        if self._stream_left:
                            return
                        break
                    take = min(need - len(buf), n - pos)
                    buf += view[pos:pos + take]
                    pos += take
                    if len(buf) < need:
                        return
                    continue
                if self._need_preamble:
                    check_preamble(buf, 0)
                    self._need_preamble = False
                else:
                    whole = bytes(buf)
                    ftype, _flags, flow_id, _length = _unpack_header(whole, 0)
                    if ftype == _DATA:  # an empty DATA frame: its flow's state is checked, nothing else
                        self._data_start(flow_id, 0)
                    else:
                        self._frame(ftype, flow_id, memoryview(whole)[HEADER_SIZE:], events)
                buf.clear()
                break
        while True:
            remaining = n - pos
            if self._need_preamble:
                if remaining < PREAMBLE_SIZE:
                    break
                check_preamble(data, pos)
                self._need_preamble = False
                pos += PREAMBLE_SIZE
                continue
            if remaining < HEADER_SIZE:
                break
            ftype, _flags, flow_id, length = _unpack_header(data, pos)
            self._check_header(ftype, flow_id, length)
            end = pos + HEADER_SIZE + length
            if end > n:
                if ftype == _DATA:
                    self._stream_flow = flow_id if self._data_start(flow_id, length) else 0
                    self._stream_left = length
                    self._stream_take(view, pos + HEADER_SIZE, n, events)
                    return
                break
            if ftype == _DATA:
                if self._data_start(flow_id, length):
                    events.append(_DataReceived(flow_id, view[pos + HEADER_SIZE:end]))
            else:
                self._frame(ftype, flow_id, view[pos + HEADER_SIZE:end], events)
            pos = end
        if pos < n:
            buf += view[pos:]

    def _stream_take(self, view: memoryview, pos: int, n: int, events: list[ev.Event]) -> int:
        take = min(self._stream_left, n - pos)
        if take:
            self._stream_left -= take
            if self._stream_flow and self._stream_flow in self.flows:
                events.append(_DataReceived(self._stream_flow, view[pos:pos + take]))
        return pos + take

    def _wanted(self, buf: bytearray) -> int:
        if self._need_preamble:
            return PREAMBLE_SIZE
        if len(buf) < HEADER_SIZE:
            return HEADER_SIZE
        ftype, _flags, flow_id, length = _unpack_header(buf, 0)
        self._check_header(ftype, flow_id, length)
        return HEADER_SIZE + length
