"""Which connector group a connector tunnel serves: decided from the edge's configuration, never
from what the connector says about itself.

``ConnectorGroups`` is built once per configuration:

- ``from_snapshot(snapshot)``: the control plane's record of every registered connector
  (``ConfigSnapshot.connectors``), looked up by the serial of the certificate the tunnel
  presented (the name in that certificate must be the record's name too). A snapshot made
  by a control plane that records no groups (an older version; ``connectors`` None) leaves
  the HELLO to decide, as before, until a newer configuration arrives;
- ``from_names(mapping)``: an application file's ``connectors`` list (certificate name ->
  group), for an edge running without a control plane;
- ``hello_decides()``: an application file with no such list: the group named in the
  connector's HELLO is taken (``DEFAULT_GROUP`` when it names none), which trusts every
  certificate of the CA for every group.

``group_of(peer, claimed)`` answers a ``GroupDecision``: the group, or None with the code and
the reason why the tunnel is filed under no group. A HELLO naming no group claims nothing;
one naming another group than the record's is refused (``group_mismatch``: the edge ends the
tunnel); a connector the record does not know (``connector_unknown``) stays connected but
serves no group until a configuration names it. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from ..basics.pki import PeerCertificate
from ..contract.apps import DEFAULT_GROUP
from ..contract.snapshot import ConfigSnapshot, SnapConnector


class GroupDecision(msgspec.Struct, frozen=True, gc=False):
    """``group`` the tunnel serves, or None with ``code`` (``group_mismatch``: refuse the tunnel;
    ``connector_unknown``: keep it, serving nothing) and ``reason``."""

    group: str | None
    code: str = ""
    reason: str = ""


class ConnectorGroups:
    """The record an edge files connector tunnels by (see the module doc)."""

    __slots__ = ("by_serial", "by_name", "source")

    def __init__(self, *, by_serial: Mapping[int, SnapConnector] | None = None,
                 by_name: Mapping[str, str] | None = None, source: str = "") -> None:
        self.by_serial = dict(by_serial) if by_serial is not None else None
        self.by_name = dict(by_name) if by_name is not None else None
        self.source = source  # says where the record comes from, in reasons

    @classmethod
    def from_snapshot(cls, snapshot: ConfigSnapshot) -> ConnectorGroups:
        if snapshot.connectors is None:
            return cls.hello_decides()
        index: dict[int, SnapConnector] = {}
        for connector in snapshot.connectors:
            for serial in connector.serials:
                index[int(serial, 16)] = connector
        return cls(by_serial=index, source=f"the control plane's configuration (version {snapshot.version})")

    @classmethod
    def from_names(cls, mapping: Mapping[str, str], source: str) -> ConnectorGroups:
        return cls(by_name=mapping, source=source)

    @classmethod
    def hello_decides(cls) -> ConnectorGroups:
        return cls()

    @property
    def trusts_hello(self) -> bool:
        """No record: each connector's HELLO names its group."""
        return self.by_serial is None and self.by_name is None

    def group_of(self, peer: PeerCertificate, claimed: str) -> GroupDecision:
        """The group the connector with certificate ``peer`` serves, its HELLO naming ``claimed``."""
        if self.trusts_hello:
            return GroupDecision(claimed or DEFAULT_GROUP)
        if self.by_serial is not None:
            record = self.by_serial.get(peer.serial)
            group = record.group if record is not None and record.name == peer.name else None
            if record is not None and group is None:
                return GroupDecision(None, "connector_unknown",
                                     f"connector {peer.name!r}: certificate {peer.serial:x} belongs to connector "
                                     f"{record.name!r} in {self.source}; serving no group")
        else:
            assert self.by_name is not None
            group = self.by_name.get(peer.name)
        if group is None:
            return GroupDecision(None, "connector_unknown",
                                 f"connector {peer.name!r} (certificate {peer.serial:x}) is not in {self.source}: "
                                 f"it serves no group until it is")
        if claimed and claimed != group:
            return GroupDecision(None, "group_mismatch",
                                 f"connector {peer.name!r} names group {claimed!r} in its HELLO, but serves group "
                                 f"{group!r} according to {self.source}")
        return GroupDecision(group)
