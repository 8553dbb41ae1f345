"""The sink's query port: requests and replies with the message module's format.

Small answers also go through Tango commands; bulk ones (slices of images,
maps) through this port, whose endpoint is the sink's ``QueryEndpoint``.
Requests are QUERY messages with ``body = {"op": ..., arguments}``; replies are
REPLY messages with the answer in arrays/scalars and ``body["error"]`` on failure.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import zmq

from . import message as m
from .store import StoreQueries
from .transport import BadPeerMessage, receive, send

OPS = ("datasets", "latest", "get", "slice", "map")


class QueryError(RuntimeError):
    """The sink answered with an error (message says what was wrong)."""


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
    """A ROUTER socket answering queries; lives in the sink's loop thread."""

    def __init__(self, context: zmq.Context, queries: StoreQueries, bind: str, port: int = 0):
        from .transport import bind_socket

        self.queries = queries
        self.sock, self.endpoint = bind_socket(context, zmq.ROUTER, bind, port)
        self.answered = 0

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
            else:
                reply = answer(self.queries, request)
            reply.body["id"] = request.body.get("id")
            self._reply(identity, reply)
            self.answered += 1

    def _reply(self, identity: bytes | None, reply: m.Message) -> None:
        try:
            send(self.sock, reply, identity, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the client left

    def close(self) -> None:
        self.sock.close(0)


class SinkClient:
    """Ask a sink for results: ``SinkClient(endpoint).get(scan, stream, index)``."""

    def __init__(self, endpoint: str, timeout_s: float = 5.0, context: zmq.Context | None = None):
        self.sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)
        self.timeout_ms = int(timeout_s * 1000)

    def ask(self, op: str, **args: Any) -> m.Message:
        request_id = uuid.uuid4().hex[:8]
        send(self.sock, m.Message(m.QUERY, body={"op": op, "id": request_id, **args}))
        while True:
            if not self.sock.poll(self.timeout_ms):
                raise TimeoutError(f"the sink did not answer {op!r} within {self.timeout_ms / 1000:.1f} s")
            _, reply = receive(self.sock)
            if reply.body.get("id") == request_id:
                break
        if "error" in reply.body:
            raise QueryError(reply.body["error"])
        return reply

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
        self.sock.close(0)
