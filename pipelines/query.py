"""The sink's query port: requests and replies with the message module's format.

Small answers also go through Tango commands; bulk ones (slices of images,
maps) through this port, whose endpoint is the sink's ``QueryEndpoint``.
Requests are QUERY messages with ``body = {"op": ..., arguments}``; replies are
REPLY messages with the answer in arrays/scalars and ``body["error"]`` on failure.

With a token configured (the definition's ``security.query_token_file``) a request
must carry it as ``body["token"]``; one without it, or with another, gets an error
reply (``body["refused"]`` says why) and never an answer, and is counted. The Tango
commands of the sink (GetResult, ...) do not use the token: Tango's access control
governs them.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

import numpy as np
import zmq

from . import message as m
from .security import RefusalLog, client_token, load_keys, token_matches
from .store import StoreQueries
from .transport import BadPeerMessage, bind_socket, connect_socket, receive, send

OPS = ("datasets", "latest", "get", "slice", "map")


class QueryError(RuntimeError):
    """The sink answered with an error (message says what was wrong)."""


class QueryRefused(QueryError):
    """The sink refused the query: a missing or wrong token, or a CURVE key it does not know."""


REFUSED = (
    "query refused: missing or wrong token; pass the token in the pipeline's security.query_token_file "
    "(SinkClient(endpoint, token_file=FILE), or the environment variable TANGOPIPE_QUERY_TOKEN_FILE=FILE)"
)


def _arg(body: dict, key: str, kind: type | tuple, default: Any = ...) -> Any:
    value = body.get(key, default)
    if value is ...:
        raise KeyError(f"query {body.get('op')!r} needs {key!r}")
    if value is not None and not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise KeyError(f"query argument {key!r} = {str(value)[:40]!r} has the wrong type")
    return value


def answer(queries: StoreQueries, request: m.Message) -> m.Message:
    """Compute the reply to one request (never raises)."""
    body = request.body
    op = body.get("op")
    reply = m.Message(m.REPLY, body={"op": op})
    try:
        if op == "datasets":
            reply.body["datasets"] = queries.store.describe()
        elif op == "latest":
            stream = _arg(body, "stream", str, None)
            latest = queries.store.latest
            msg = latest.get(stream) if stream else next(reversed(list(latest.values())), None)
            if msg is None:
                raise KeyError(f"no result yet{' for stream ' + repr(stream) if stream else ''}")
            _copy_result(msg, reply)
        elif op == "get":
            msg = queries.get(_arg(body, "scan", (int, str)), _arg(body, "stream", str), _arg(body, "index", int))
            _copy_result(msg, reply)
        elif op == "slice":
            indices, values = queries.slice(
                _arg(body, "scan", (int, str)), _arg(body, "stream", str), _arg(body, "name", str),
                _arg(body, "start", int, 0), _arg(body, "stop", int, None),
            )
            reply.arrays = {"indices": indices, "values": values}
        elif op == "map":
            reply.arrays = {"map": queries.map(_arg(body, "scan", (int, str)), _arg(body, "stream", str),
                                               _arg(body, "name", str))}
        else:
            raise KeyError(f"unknown query {str(op)[:40]!r}; expected one of {', '.join(OPS)}")
    except KeyError as exc:
        reply.body["error"] = str(exc.args[0] if exc.args else exc)
    return reply


def _copy_result(msg: m.Message, reply: m.Message) -> None:
    reply.scan, reply.index, reply.stream = msg.scan, msg.index, msg.stream
    reply.arrays, reply.scalars, reply.version = dict(msg.arrays), dict(msg.scalars), msg.version


class QueryServer:
    """A ROUTER socket answering queries; lives in the sink's loop thread.

    With a ``token``, only requests carrying it are answered; the others get an error
    reply and are counted in :attr:`refusals` (by reason, logged at a bounded rate).
    """

    def __init__(self, context: zmq.Context, queries: StoreQueries, bind: str, port: int = 0, token: str = "",
                 log: logging.Logger | None = None):
        self.queries = queries
        self.token = token
        self.sock, self.endpoint = bind_socket(context, zmq.ROUTER, bind, port)
        self.answered = 0
        self.refusals = RefusalLog(log or logging.getLogger("tangopipe.query"), f"query port {self.endpoint}")

    @property
    def refused(self) -> int:
        return self.refusals.total

    def serve(self, bad) -> None:
        for _ in range(32):
            try:
                identity, request = receive(self.sock, routed=True, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except BadPeerMessage as exc:
                bad.record(exc.reason, exc.detail)
                if exc.identity is not None:
                    self._reply(exc.identity, m.Message(m.REPLY, body={"error": f"bad request: {exc}"}))
                continue
            if request.kind != m.QUERY:
                bad.record("unexpected_kind", f"{request.kind} on the query port")
                reply = m.Message(m.REPLY, body={"error": f"expected a query, got {request.kind}"})
            elif self.token and not token_matches(request.body.get("token"), self.token):
                reply = self._refuse(request)
            else:
                reply = answer(self.queries, request)
                self.answered += 1
            reply.body["id"] = request.body.get("id")
            self._reply(identity, reply)

    def _refuse(self, request: m.Message) -> m.Message:
        given = request.body.get("token")
        reason = "missing_token" if given in (None, "") else "wrong_token"
        how = "without a token" if reason == "missing_token" else "with a wrong token"
        self.refusals.record(reason, f"query {str(request.body.get('op'))[:40]!r} {how}")
        return m.Message(m.REPLY, body={"op": request.body.get("op"), "refused": reason, "error": REFUSED})

    def _reply(self, identity: bytes | None, reply: m.Message) -> None:
        try:
            send(self.sock, reply, identity, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the client left

    def close(self) -> None:
        self.sock.close(0)


class SinkClient:
    """Ask a sink for results: ``SinkClient(endpoint).get(scan, stream, index)``.

    ``token``/``token_file``: the query token when the pipeline has one (default: the
    environment variable ``TANGOPIPE_QUERY_TOKEN``, or the file named by
    ``TANGOPIPE_QUERY_TOKEN_FILE``). ``curve_keys``: the pipeline's CURVE key folder when its
    data plane is encrypted; the client uses the pair ``clients/CURVE_CLIENT.key_secret`` there,
    or the pipeline's own pair without ``curve_client``.
    """

    def __init__(
        self,
        endpoint: str,
        timeout_s: float = 5.0,
        context: zmq.Context | None = None,
        *,
        token: str | None = None,
        token_file: str | os.PathLike | None = None,
        curve_keys: str | os.PathLike | None = None,
        curve_client: str | None = None,
    ):
        self.token = client_token(token, token_file)
        keys = load_keys(curve_keys, curve_client) if curve_keys else None
        self.sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
        self.sock.linger = 0
        self._monitor: zmq.Socket | None = None
        if keys is not None:  # to tell "the sink refused our key" from "the sink is not there"
            self._monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                                         | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        connect_socket(self.sock, endpoint, keys)
        self.endpoint = endpoint
        self.timeout_ms = int(timeout_s * 1000)

    def ask(self, op: str, **args: Any) -> m.Message:
        request_id = uuid.uuid4().hex[:8]
        body = {"op": op, "id": request_id, **args}
        if self.token:
            body["token"] = self.token
        send(self.sock, m.Message(m.QUERY, body=body))
        while True:
            if not self.sock.poll(self.timeout_ms):
                self._handshake_refused()
                raise TimeoutError(f"the sink did not answer {op!r} within {self.timeout_ms / 1000:.1f} s")
            _, reply = receive(self.sock)
            if reply.body.get("id") == request_id:
                break
        if "refused" in reply.body:
            raise QueryRefused(reply.body.get("error", "query refused"))
        if "error" in reply.body:
            raise QueryError(reply.body["error"])
        return reply

    def _handshake_refused(self) -> None:
        """Raise QueryRefused if the sink turned down this client's CURVE handshake."""
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise QueryRefused(f"the sink at {self.endpoint} refused this client's CURVE key: put its public "
                                   "key file in the pipeline's key folder, under authorized/")
            if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                raise QueryRefused(f"CURVE handshake with {self.endpoint} failed: is the pipeline's data plane "
                                   "encrypted, and is this its key folder?")

    def datasets(self) -> list[dict]:
        return self.ask("datasets").body["datasets"]

    def latest(self, stream: str | None = None) -> m.Message:
        return self.ask("latest", stream=stream)

    def get(self, scan: int | str, stream: str, index: int) -> m.Message:
        return self.ask("get", scan=scan, stream=stream, index=index)

    def slice(self, scan: int | str, stream: str, name: str, start: int = 0, stop: int | None = None):
        reply = self.ask("slice", scan=scan, stream=stream, name=name, start=start, stop=stop)
        return reply.arrays["indices"], reply.arrays["values"]

    def map(self, scan: int | str, stream: str, name: str) -> np.ndarray:
        return self.ask("map", scan=scan, stream=stream, name=name).arrays["map"]

    def close(self) -> None:
        if self._monitor is not None:
            self.sock.disable_monitor()
            self._monitor.close(0)
            self._monitor = None
        self.sock.close(0)
