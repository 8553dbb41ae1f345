"""ZeroMQ plumbing shared by the stages: binding, sending, receiving, peers.

Links that must not lose data are credit links: the receiving side connects a
DEALER to the sending side's ROUTER, says HELLO with how many messages it can
hold, and grants one credit back for each message it has finished with. The
sender only sends to peers with credit, so a slow peer is never flooded and a
dead one holds at most its credit.

Security is applied here and nowhere else: on a context with CURVE keys
(:func:`pipelines.security.use_curve`), :func:`bind_socket` makes CURVE servers
and :func:`connect_socket` CURVE clients, so the engines need not know.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import zmq

from .message import BadMessage, Message, decode, decode_many, encode, encode_batch
from .security import CurveKeys, curve_guard, curve_of


def advertised_host(bind: str) -> str:
    """The host name peers should use for a socket bound to ``bind``."""
    if bind in ("*", "0.0.0.0", "", "::"):
        return socket.getfqdn() or socket.gethostname()
    return bind


def bind_socket(context: zmq.Context, kind: int, bind: str = "127.0.0.1", port: int = 0) -> tuple[zmq.Socket, str]:
    """Bind a new socket on ``tcp://bind:port`` (0: a free port); return it and its public endpoint.

    With CURVE keys on ``context`` the socket is a CURVE server (only authorised clients get in).
    """
    sock = context.socket(kind)
    sock.linger = 0
    guard = curve_guard(context)
    if guard is not None:
        guard.keys.make_server(sock)
    address = "*" if bind in ("", "0.0.0.0") else bind
    try:
        if port:
            sock.bind(f"tcp://{address}:{port}")
        else:
            port = sock.bind_to_random_port(f"tcp://{address}")
    except zmq.ZMQError as exc:
        sock.close()
        raise OSError(f"cannot bind tcp://{address}:{port or '*'}: {exc}; choose another port or address") from exc
    if guard is not None:
        guard.watch(sock, f"tcp://{address}:{port}")  # counts clients failing the handshake
    return sock, f"tcp://{advertised_host(bind)}:{port}"


def connect_socket(sock: zmq.Socket, endpoint: str, keys: CurveKeys | None = None) -> None:
    """Connect ``sock`` to ``endpoint``; a CURVE client with ``keys``, or with its context's keys if any."""
    keys = keys or curve_of(sock.context)
    if keys is not None:
        keys.make_client(sock)
    sock.connect(endpoint)


def send(sock: zmq.Socket, msg: Message | list[Message], identity: bytes | None = None, flags: int = 0) -> None:
    """Send one message, or a list of messages as one batch (one credit)."""
    parts = encode_batch(msg) if isinstance(msg, list) else encode(msg)
    if identity is not None:
        parts = [identity, *parts]
    sock.send_multipart(parts, copy=False, flags=flags)


class BadPeerMessage(BadMessage):
    """A bad message together with who sent it (ROUTER sockets)."""

    def __init__(self, error: BadMessage, identity: bytes | None):
        super().__init__(error.reason, error.detail)
        self.identity = identity


def receive(sock: zmq.Socket, routed: bool = False, flags: int = 0) -> tuple[bytes | None, Message]:
    """Receive one message; ``routed`` for ROUTER sockets (first part is the peer)."""
    frames = sock.recv_multipart(copy=False, flags=flags)
    identity = None
    if routed:
        identity = frames[0].bytes
        frames = frames[1:]
    try:
        return identity, decode(frames)
    except BadMessage as exc:
        raise BadPeerMessage(exc, identity) from None


def receive_many(sock: zmq.Socket, flags: int = 0) -> list[Message]:
    """Receive one message or batch (DEALER/PULL side); BadPeerMessage if malformed."""
    frames = sock.recv_multipart(copy=False, flags=flags)
    try:
        return decode_many(frames)
    except BadMessage as exc:
        raise BadPeerMessage(exc, None) from None


def new_identity(name: str) -> bytes:
    """A routing id unique to this run of a peer, so a restarted peer is a new peer."""
    return f"{name}#{uuid.uuid4().hex[:8]}".encode()


@dataclass
class Peer:
    """A downstream peer of a ROUTER socket, as the sender sees it."""

    identity: bytes
    name: str
    group: str = ""
    credit: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    in_flight: OrderedDict[tuple, Any] = field(default_factory=OrderedDict)
    sent: int = 0
    done: int = 0
    last_sent: int = 0  # dispatch number of the last item sent to this peer

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group": self.group,
            "credit": self.credit,
            "in_flight": len(self.in_flight),
            "sent": self.sent,
            "done": self.done,
            "silent_s": round(time.monotonic() - self.last_seen, 2),
        }


def key_of(msg: Message) -> list:
    """The JSON-able identity of a data message, as acknowledged in credit messages."""
    return [msg.scan, msg.kind, msg.index]


def key_tuple(key: Any) -> tuple:
    if not isinstance(key, list | tuple) or len(key) != 3:
        raise BadMessage("bad_credit", f"done key {str(key)[:60]!r} is not [scan, kind, index]")
    return tuple(key)


class UpstreamLink:
    """The receiving end of a credit link: a DEALER connected to an upstream ROUTER.

    Used by workers (towards the master) and by consumers (towards a sorter).
    Lives in its engine's loop thread.
    """

    def __init__(self, context: zmq.Context, name: str, group: str = "", credit: int = 4):
        if not 1 <= credit <= 1024:
            raise ValueError(f"credit must be between 1 and 1024, got {credit}")
        self.context = context
        self.name = name
        self.group = group
        self.credit = credit
        self.endpoint = ""
        self.sock: zmq.Socket | None = None
        self.last_heartbeat = 0.0

    def connect(self, endpoint: str, outstanding: int = 0) -> None:
        """(Re)connect to ``endpoint`` as a new peer and announce the free credit."""
        self.close()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.routing_id = new_identity(self.name)
        connect_socket(self.sock, endpoint)
        self.endpoint = endpoint
        self.hello(outstanding)

    def hello(self, outstanding: int = 0, extra: dict[str, Any] | None = None) -> None:
        """Announce this peer; ``extra`` adds fields to the body (it cannot replace name, group, credit)."""
        free = max(1, self.credit - outstanding)
        body = dict(extra or {})
        body.update(name=self.name, group=self.group, credit=free)
        self._send(Message("hello", body=body))

    def grant(self, n: int = 1, done: list | None = None) -> None:
        body: dict[str, Any] = {"n": n}
        if done:
            body["done"] = done
        self._send(Message("credit", body=body))

    def heartbeat_due(self, period_s: float) -> bool:
        now = time.monotonic()
        if now - self.last_heartbeat >= period_s:
            self.last_heartbeat = now
            return True
        return False

    def heartbeat(self) -> None:
        self._send(Message("heartbeat"))

    def bye(self) -> None:
        self._send(Message("bye"))

    def _send(self, msg: Message) -> None:
        if self.sock is not None:
            try:
                send(self.sock, msg, flags=zmq.NOBLOCK)
            except zmq.Again:  # upstream not reachable right now; heartbeats will retry
                pass

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None


def drain(sock: zmq.Socket, bad: Any, routed: bool = False, limit: int = 64):
    """Yield up to ``limit`` waiting messages as (identity, message) without blocking;
    malformed ones are recorded in ``bad`` (a BadMessageLog) and skipped."""
    for _ in range(limit):
        try:
            yield receive(sock, routed=routed, flags=zmq.NOBLOCK)
        except zmq.Again:
            return
        except BadPeerMessage as exc:
            bad.record(exc.reason, exc.detail)
