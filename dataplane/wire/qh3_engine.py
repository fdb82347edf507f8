"""The qh3 QUIC engine: every use of qh3 in Ferryman, and every reach into its internals.

``QH3`` implements ``quic_engine.QuicEngine`` on qh3's sans-I/O ``QuicConnection`` (aioquic's
API lineage, with a native packet core: packet protection, loss recovery, congestion control
and stream reassembly outside the interpreter). What Ferryman needs and qh3 has no switch for
is done here:

- **client certificates**: a qh3 server never requests one. ``_ClientAuthContext`` (qh3's TLS
  ``Context`` plus a CertificateRequest offering ECDSA P-256/P-384 and RSA-PSS) sends the
  request after EncryptedExtensions, reads the client's Certificate and checks its
  CertificateVerify signature (proof that the client holds the key); the chain check stays
  the transport's (``transport.quic.verify_peer``), as with aioquic. A client that sends no
  certificate reaches ``HandshakeCompleted`` with none and is refused there. The dialer's
  own check of the edge's chain is also the transport's (qh3's verifier is switched off;
  the CertificateVerify signature is still checked by qh3);
- **stream limits**: qh3 fixes them at 100 bidirectional streams; here the limit follows the
  flow limit (``max_streams``) and unidirectional streams are refused (limit 0), in the
  transport parameters and in the native core alike;
- **datagram queue**: qh3 queues DATAGRAM frames without bound and without telling how many
  wait. Frames wait here (``_datagrams``) and are handed to the core only while the
  congestion window has room, so ``pending_datagrams`` is exact and the transport bounds it;
- **no MTU probing**: packets stay at the configured size (``probe_datagram_size`` off).

qh3 slides its stream and connection receive windows as its native core hands data out (it
has no "consumed" call), so ``received`` has nothing to do; ``hold`` leaves the core's events
in the core, which then gives the peer no credit. A failure inside the native core
(``QuicConnectionError``) becomes ``quic_engine.EngineFailure``: that connection is dead, the
tunnel ends with ``quic_error``. Nothing outside this module imports qh3.
"""

from __future__ import annotations

import ssl
from collections import deque
from typing import Any

from qh3 import tls
from qh3._hazmat import Buffer
from qh3._hazmat import Certificate as QhCertificate
from qh3._hazmat import QuicConnectionCore, SignatureError, verify_with_public_key
from qh3._hazmat import pull_quic_header as _pull_quic_header
from qh3.quic import events as qev
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection, QuicConnectionError
from qh3.quic.packet import (
    QuicErrorCode,
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_transport_parameters,
    push_quic_transport_parameters,
)
from qh3.quic.tls_bridge import QuicTlsBridge
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from .quic_engine import EngineFailure, Header, event_kinds

CRYPTO_FRAME = 0x06  # the frame type named in a TLS alert's CONNECTION_CLOSE
# What a server's CertificateRequest offers (and accepts in the client's CertificateVerify).
CLIENT_SIGNATURES = (
    tls.SignatureAlgorithm.ECDSA_SECP256R1_SHA256,
    tls.SignatureAlgorithm.ECDSA_SECP384R1_SHA384,
    tls.SignatureAlgorithm.RSA_PSS_RSAE_SHA256,
    tls.SignatureAlgorithm.RSA_PSS_RSAE_SHA384,
)
_INITIAL_RTT = 0.1  # as aioquic: the handshake's first retransmit after 3 x this
_CERT, _VERIFY = 1, 2  # what a client-authenticating server expects after its flight


# ---------------------------------------------------------------------------- TLS: client certificates


class _Transcript:
    """The server's key schedule, inserting the CertificateRequest into its first flight.

    qh3 writes the server flight (EncryptedExtensions, Certificate, CertificateVerify,
    Finished) in one function and hashes each message as it goes; right after
    EncryptedExtensions is hashed, the CertificateRequest is written and hashed, so the
    transcript (and the server's signature and Finished) cover it in RFC 8446 order. qh3
    then hashes the client Finished it expects (no client authentication); that one is
    skipped, and the expected Finished is computed again once the client's Certificate and
    CertificateVerify are read."""

    __slots__ = ("_ks", "_ctx")

    def __init__(self, key_schedule: Any, ctx: _ClientAuthContext) -> None:
        self._ks = key_schedule
        self._ctx = ctx

    def update_hash(self, data: bytes) -> None:
        ctx = self._ctx
        out = ctx._flight
        if out is None or not data:
            self._ks.update_hash(data)
            return
        kind = data[0]
        if kind == tls.HandshakeType.FINISHED:
            ctx._finished_seen += 1
            if ctx._finished_seen > 1:
                return  # the client Finished qh3 anticipates: ours comes after its certificate
        self._ks.update_hash(data)
        if kind == tls.HandshakeType.ENCRYPTED_EXTENSIONS:
            start = out.tell()
            _push_certificate_request(out)
            self._ks.update_hash(out.data_slice(start, out.tell()))
            ctx._expect = _CERT

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ks, name)


def _push_certificate_request(buf: Buffer) -> None:
    buf.push_uint8(tls.HandshakeType.CERTIFICATE_REQUEST)
    with tls.push_block(buf, 3):
        tls.push_opaque(buf, 1, b"")  # certificate_request_context: empty during the handshake
        with tls.push_block(buf, 2):  # extensions
            with tls.push_extension(buf, tls.ExtensionType.SIGNATURE_ALGORITHMS):
                tls.push_list(buf, 2, buf.push_uint16, list(CLIENT_SIGNATURES))


class _ClientAuthContext(tls.Context):
    """qh3's server TLS context, requesting and reading the client's certificate (see ``_Transcript``).

    Made from a plain ``tls.Context`` by ``_adopt`` (the bridge builds the context itself)."""

    _flight: Buffer | None
    _finished_seen: int
    _expect: int
    _ks: Any

    @classmethod
    def _adopt(cls, context: tls.Context) -> None:
        ks = context.__dict__.pop("key_schedule", None)
        context.__class__ = cls
        context._flight = None
        context._finished_seen = 0
        context._expect = 0
        context._ks = ks

    @property  # type: ignore[override]
    def key_schedule(self) -> Any:
        return self._ks

    @key_schedule.setter
    def key_schedule(self, value: Any) -> None:
        self._ks = _Transcript(value, self) if value is not None and not isinstance(value, _Transcript) else value

    def _server_handle_hello(self, input_buf: Buffer, initial_buf: Buffer, handshake_buf: Buffer,
                             onertt_buf: Buffer) -> None:
        self._flight = handshake_buf
        try:
            super()._server_handle_hello(input_buf, initial_buf, handshake_buf, onertt_buf)
        finally:
            self._flight = None
        if self._expect != _CERT:
            raise tls.AlertInternalError("the certificate request was not sent")

    def handle_message(self, input_data: bytes, output_buf: dict, epoch: int = -1) -> None:
        if not self._expect or self.state != tls.State.SERVER_EXPECT_FINISHED:
            super().handle_message(input_data, output_buf, epoch)
            return
        self._receive_buffer += input_data
        while self._expect and len(self._receive_buffer) >= 4:
            length = 4 + int.from_bytes(self._receive_buffer[1:4], "big")
            if len(self._receive_buffer) < length:
                return
            if epoch >= 0 and epoch != tls.Epoch.HANDSHAKE:
                raise tls.AlertUnexpectedMessage("client certificate outside the handshake epoch")
            message = self._receive_buffer[:length]
            self._receive_buffer = self._receive_buffer[length:]
            buf = Buffer(data=message)
            if self._expect == _CERT:
                self._client_certificate(message[0], buf)
            else:
                self._client_certificate_verify(message[0], buf)
            if not buf.eof():
                raise tls.AlertDecodeError("extra bytes at the end of a handshake message")
            self._ks.update_hash(message)
            if not self._expect:
                self._expected_verify_data = self._ks.finished_verify_data(self._dec_key)
        if not self._expect:
            rest, self._receive_buffer = self._receive_buffer, b""
            super().handle_message(rest, output_buf, epoch)

    def _client_certificate(self, kind: int, buf: Buffer) -> None:
        if kind != tls.HandshakeType.CERTIFICATE:
            raise tls.AlertUnexpectedMessage("expected the client's Certificate")
        certificate = tls.pull_certificate(buf)
        if certificate.request_context != b"":
            raise tls.AlertIllegalParameter("client Certificate with a request context")
        if not certificate.certificates:
            self._expect = 0  # no certificate: no CertificateVerify; the transport refuses the client
            return
        try:
            self._peer_certificate = QhCertificate(certificate.certificates[0][0])
            self._peer_certificate_chain = [QhCertificate(c[0]) for c in certificate.certificates[1:]]
        except Exception as exc:  # qh3's parser raises its own errors
            raise tls.AlertBadCertificate(f"client certificate cannot be parsed: {exc}") from None
        self._expect = _VERIFY

    def _client_certificate_verify(self, kind: int, buf: Buffer) -> None:
        if kind != tls.HandshakeType.CERTIFICATE_VERIFY:
            raise tls.AlertUnexpectedMessage("expected the client's CertificateVerify")
        verify = tls.pull_certificate_verify(buf)
        if verify.algorithm not in CLIENT_SIGNATURES:
            raise tls.AlertIllegalParameter(f"client CertificateVerify with algorithm 0x{verify.algorithm:04x}")
        assert self._peer_certificate is not None
        try:
            verify_with_public_key(
                self._peer_certificate.public_key(), verify.algorithm,
                self._ks.certificate_verify_data(b"TLS 1.3, client CertificateVerify"), verify.signature,
            )
        except SignatureError as exc:
            raise tls.AlertDecryptError(f"client CertificateVerify: {exc}") from None
        self._expect = 0


# ---------------------------------------------------------------------------- connection


class _Bridge(QuicTlsBridge):
    """qh3's TLS half with Ferryman's stream limits in the transport parameters and, for a
    server, the client certificate request."""

    def __init__(self, configuration: QuicConfiguration, *, max_streams: int, **kwargs: Any) -> None:
        self._max_streams = max_streams
        super().__init__(configuration, **kwargs)
        if not configuration.is_client:
            _ClientAuthContext._adopt(self.tls)

    def serialize_transport_parameters(self) -> bytes:
        parameters = pull_quic_transport_parameters(Buffer(data=super().serialize_transport_parameters()))
        parameters.initial_max_streams_bidi = self._max_streams
        parameters.initial_max_streams_uni = 0
        buf = Buffer(capacity=3 * self.configuration.max_datagram_size)
        push_quic_transport_parameters(buf, parameters)
        return buf.data


class _Qh3(QuicConnection):
    """qh3's connection with Ferryman's limits and the ``quic_engine.EngineConnection`` calls."""

    def __init__(self, configuration: QuicConfiguration, *, max_streams: int,
                 original_destination_connection_id: bytes | None,
                 retry_source_connection_id: bytes | None) -> None:
        self._max_streams = max_streams
        super().__init__(configuration=configuration,
                         original_destination_connection_id=original_destination_connection_id,
                         retry_source_connection_id=retry_source_connection_id)
        self._datagrams: deque[bytes] = deque()
        self._max_packet = configuration.max_datagram_size
        self.held = False
        self.dropped_datagrams = 0  # qh3 cannot drop a held DATAGRAM frame alone: always 0
        self.failure: str | None = None  # the native core failed: the connection is dead

    def _failed(self, exc: QuicConnectionError) -> EngineFailure:
        self.failure = f"qh3 failed: {exc.reason_phrase}"
        self._core = None  # nothing more is sent or timed; close() has nothing to do
        return EngineFailure(self.failure)

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        if self.failure is not None:
            return
        core = self._core
        try:
            if core is not None and self._handshake_complete:
                # after the handshake a datagram is 1-RTT packets only: straight to the native core
                # (qh3's own path walks the packets in Python for what only the handshake needs)
                core.receive_many_datagrams([data], addr, now)
                self._drain_core()
            else:
                super().receive_datagram(data, addr, now)
        except RuntimeError as exc:  # the native core's own failures
            raise self._failed(QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc))) from None
        except QuicConnectionError as exc:
            raise self._failed(exc) from None

    def receive_segments(self, buffer: bytes, segment: int, addr: Any, now: float) -> None:
        if self.failure is not None:
            return
        try:
            self.receive_gro_buffer(buffer, segment, addr, now)
        except QuicConnectionError as exc:
            raise self._failed(exc) from None

    def handle_timer(self, now: float) -> None:
        try:
            super().handle_timer(now)
        except QuicConnectionError as exc:
            raise self._failed(exc) from None

    def close(self, error_code: int = 0, frame_type: int | None = None, reason_phrase: str = "") -> None:
        try:
            super().close(error_code, frame_type, reason_phrase)
        except QuicConnectionError:
            self._core = None

    # qh3's own constructors of the native core and the TLS bridge, with our limits
    def _create_core(self, remote_addr: Any, initial_dcid: bytes, now: float) -> None:
        c = self._configuration
        self._core = QuicConnectionCore(
            self._is_client, self._version, ("0.0.0.0", 0), remote_addr, self.host_cid, initial_dcid,
            self._is_client or self._retry_source_connection_id is not None,
            2 if self._is_client else 8,  # active_connection_id_limit
            c.max_datagram_size, False, c.idle_timeout, 3, c.max_datagram_frame_size, None,
            c.max_data, 0, c.max_stream_data, 0, 0, 0, c.max_stream_data,
            self._max_streams, 0, 0, 0, c.initial_rtt, 0.025, now,
        )
        self._applied_transport_parameters = None
        self._pre_handshake_state_replayed = False

    def _create_tls(self, remote_source_cid: bytes | None) -> QuicTlsBridge:
        self._tls = _Bridge(
            self._configuration, max_streams=self._max_streams, version=self._version,
            local_initial_source_connection_id=self.host_cid, remote_initial_source_connection_id=remote_source_cid,
            original_destination_connection_id=self._original_destination_connection_id,
            retry_source_connection_id=self._retry_source_connection_id, quic_logger=None,
            version_change_handler=self._set_version,
        )
        return self._tls

    def _drain_core(self) -> None:
        if self.held and self._handshake_complete and not self.ending():
            return  # the core keeps its events; what it has not handed out it does not credit
        super()._drain_core()

    def ending(self) -> bool:
        core = self._core
        return self.failure is not None or self._close_event is not None or (
            core is not None and core.state in ("closing", "draining", "terminated"))

    # ------------------------------------------------------------------ EngineConnection
    def hold(self, on: bool) -> None:
        """While held, the native core's events stay in the core: qh3 slides a stream's and the
        connection's receive windows only as it hands data out, so the peer gets no credit.
        DATAGRAM frames wait there too (in order with stream data); the wire layer bounds the
        packets fed meanwhile."""
        self.held = on
        if not on and self._core is not None:
            super()._drain_core()

    def send(self, stream_id: int, data: bytes | memoryview, end_stream: bool) -> None:
        if self._close_event is None:  # (once closing, qh3 refuses data: it would never be sent)
            self.send_stream_data(stream_id, data, end_stream)

    def received(self, stream_id: int, size: int) -> None:
        pass  # qh3 slides its windows as it delivers (see the module docstring)

    def backlog(self) -> int:
        """Stream bytes not yet sent once, plus the DATAGRAM frames waiting here."""
        return self.get_send_buffer_size() + len(self._datagrams) * self._max_packet

    def pending_datagrams(self) -> int:
        return len(self._datagrams)

    def send_datagram_frame(self, data: bytes | memoryview) -> None:  # type: ignore[override]
        if self._close_event is None:
            self._datagrams.append(bytes(data))

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        try:
            return self._datagrams_to_send(now)
        except QuicConnectionError as exc:
            raise self._failed(exc) from None

    def _datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        core = self._core
        if core is None:
            return []
        out: list[tuple[bytes, Any]] = []
        queue = self._datagrams
        if queue and self._handshake_complete and self._close_event is None:
            size = self._max_packet
            send = core.send_datagram
            while True:
                room = (core.congestion_window - core.bytes_in_flight) // size
                if room <= 0 or not queue:
                    break
                for _ in range(min(room, len(queue))):
                    send(queue.popleft())
                self._poll(core, now, out)
        self._poll(core, now, out)
        return out

    def _poll(self, core: Any, now: float, out: list[tuple[bytes, Any]]) -> None:
        """The native core's packets to send now, onto ``out``. (qh3's own ``datagrams_to_send``
        walks every packet's headers in Python for a packet log this engine never keeps: about
        a tenth of an edge's CPU in bulk.)"""
        if self._quic_logger is not None:
            out.extend(super().datagrams_to_send(now))
            return
        poll = core.poll_transmit
        try:
            while True:
                transmit = poll(now)
                if transmit is None:
                    return
                out.append((transmit[0], transmit[1]))
        except RuntimeError as exc:  # the native core's own failures, as qh3 reports them
            raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from None

    def peer_certificates(self) -> tuple[bytes | None, list[bytes]]:
        cert = self.get_peercert()
        if cert is None:
            return None, []
        return cert.public_bytes(), [c.public_bytes() for c in self.get_issuercerts()]

    def close_with_alert(self, alert: int, reason: str) -> None:
        self.close(QuicErrorCode.CRYPTO_ERROR + alert, CRYPTO_FRAME, reason)


_EVENTS = event_kinds("qh3", qev)


def _der_certificate(certificate: Any) -> QhCertificate:
    return QhCertificate(certificate.public_bytes(Encoding.DER))


class Qh3Engine:
    """``quic_engine.QuicEngine`` on qh3."""

    name = "qh3"
    events = _EVENTS

    def configuration(self, *, client: bool, packet_size: int, cid_length: int, idle_timeout: float,
                      server_name: str | None, certificate: Any, chain: list[Any], private_key: Any,
                      ca_pem: bytes) -> QuicConfiguration:
        config = QuicConfiguration(is_client=client, max_datagram_size=packet_size, connection_id_length=cid_length,
                                   idle_timeout=idle_timeout, server_name=server_name, probe_datagram_size=False,
                                   initial_rtt=_INITIAL_RTT)
        if certificate is not None and private_key is not None:  # (a client may have none: it is refused)
            config.certificate = _der_certificate(certificate)
            config.certificate_chain = [_der_certificate(c) for c in chain]
            config.private_key = tls.load_pem_private_key(
                private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
        config.cadata = ca_pem
        # The transport checks the peer's chain and name (transport.quic.verify_peer) before a
        # byte of the tunnel is exchanged; qh3 still checks the CertificateVerify signature.
        config.verify_mode = ssl.CERT_NONE
        return config

    def is_client(self, configuration: QuicConfiguration) -> bool:
        return configuration.is_client

    def max_datagram_size(self, configuration: QuicConfiguration) -> int:
        return configuration.max_datagram_size

    def supported_versions(self, configuration: QuicConfiguration) -> list[int]:
        return [int(v) for v in configuration.supported_versions]

    def connection(self, configuration: QuicConfiguration, *, alpn: str, max_streams: int, stream_window: int,
                   connection_window: int, original_destination_connection_id: bytes | None = None,
                   retry_source_connection_id: bytes | None = None) -> _Qh3:
        config = QuicConfiguration(**{f: getattr(configuration, f) for f in configuration.__dataclass_fields__})
        config.max_stream_data = stream_window
        config.max_data = connection_window
        config.max_datagram_frame_size = 65535
        config.alpn_protocols = [alpn]
        return _Qh3(config, max_streams=max_streams,
                    original_destination_connection_id=original_destination_connection_id,
                    retry_source_connection_id=retry_source_connection_id)

    def parse_header(self, data: bytes, cid_length: int) -> Header | None:
        try:
            h = _pull_quic_header(data, 0, cid_length)
        except ValueError:
            return None
        return Header(initial=h[1] == QuicPacketType.INITIAL,
                      version_negotiation=h[1] == QuicPacketType.VERSION_NEGOTIATION,
                      version=h[0], destination_cid=h[3], source_cid=h[4], token=h[5] or b"")

    def version_negotiation(self, header: Header, versions: list[int]) -> bytes:
        return encode_quic_version_negotiation(source_cid=header.destination_cid, destination_cid=header.source_cid,
                                               supported_versions=versions)

    def retry(self, header: Header, new_cid: bytes, token: bytes) -> bytes:
        assert header.version is not None
        return encode_quic_retry(version=header.version, source_cid=new_cid, destination_cid=header.source_cid,
                                 original_destination_cid=header.destination_cid, retry_token=token)


QH3 = Qh3Engine()
