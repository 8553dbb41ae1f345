"""The sink: the latest results of every stream in memory, for anyone who asks.

It consumes a sorter's ordered stream into a :class:`~pipelines.store.SinkStore`,
keeps the newest result per stream for GUIs, and offers every image-like result
to a live-view publisher (Lavue), which is latest-only and never slows the sink.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import numpy as np
import zmq

from . import message as m
from .consumer import ConsumerEngine
from .query import QueryServer
from .store import SinkStore, StoreQueries


class ImagePublisher(Protocol):
    def offer(self, topic: str, image: np.ndarray, meta: dict | None = None, name: str | None = None) -> None: ...


def image_topic(stream: str, name: str) -> str:
    """The live-view topic of result ``name`` of ``stream`` (ASCII, no slash)."""
    return f"{stream}.{name}".replace("/", ".")


class SinkEngine(ConsumerEngine):
    """See the module docstring."""

    def __init__(
        self,
        *,
        name: str = "sink",
        memory_limit: int = 1 << 30,
        publisher: ImagePublisher | None = None,
        credit: int = 16,
        bind: str = "127.0.0.1",
        query_port: int = 0,
        query_token: str = "",
        context: zmq.Context | None = None,
    ):
        super().__init__(name, credit=credit, context=context)
        self.store = SinkStore(memory_limit)
        self.queries = StoreQueries(self.store)
        self.bind, self.query_port = bind, query_port
        self.query_token = query_token  # queries must carry it (empty: no token needed)
        self.query_server: QueryServer | None = None
        self.endpoint = ""
        self.publisher = publisher
        self.topics: list[str] = []
        self.last_update = 0.0
        self.scan_meta: dict[str, Any] = {}

    def setup(self) -> None:
        self.query_server = QueryServer(self.context, self.queries, self.bind, self.query_port, self.query_token, self.log)
        self.endpoint = self.query_server.endpoint

    def extra_sockets(self) -> list[zmq.Socket]:
        return [self.query_server.sock] if self.query_server is not None else []

    def on_socket(self, sock: zmq.Socket) -> None:
        assert self.query_server is not None
        self.query_server.serve(self.stats.bad)

    def teardown(self) -> None:
        if self.query_server is not None:
            self.query_server.close()
        super().teardown()

    def handle(self, msg: m.Message) -> None:
        if msg.kind == m.SCAN_START:
            self.scan_meta = dict(msg.meta)
            self.store.start_scan(msg)
        elif msg.kind in (m.RESULT, m.GAP):
            self.store.add(msg)
            if msg.kind == m.RESULT:
                self.stats.count_out()
                self.last_update = time.time()
                self._publish(msg)
        self.emit(msg.kind, msg)

    def _publish(self, msg: m.Message) -> None:
        for name, array in msg.arrays.items():
            if array.ndim not in (2, 3):
                continue
            topic = image_topic(msg.stream, name)
            if topic not in self.topics:
                self.topics.append(topic)
                self.emit("topics", list(self.topics))
            if self.publisher is not None:
                meta = {"scan": msg.scan, "index": msg.index, "stream": msg.stream}
                self.publisher.offer(topic, array, meta, name=f"scan {msg.scan} #{msg.index}")

    # -- queries (thread-safe through the loop) ------------------------------------------
    def latest(self, stream: str | None = None) -> m.Message | None:
        latest = self.store.latest
        if stream is None:
            return max(latest.values(), key=lambda x: x.times.get("sorter", 0), default=None)
        return latest.get(stream)

    def latest_image(self, name: str | None = None) -> np.ndarray | None:
        """The newest 2D array result (named ``name``, or the first one)."""
        msg = self.latest()
        if msg is None:
            return None
        for key, array in msg.arrays.items():
            if array.ndim == 2 and (name is None or key == name):
                return array
        return None

    def counters(self) -> dict[str, Any]:
        c = super().counters()
        c.update(
            StoredBytes=self.store.nbytes,
            MemoryLimit=self.store.memory_limit,
            Datasets=len(self.store.datasets),
            Evictions=self.store.evictions,
            ThinnedResults=self.store.thinned,
            TrimmedResults=self.store.trimmed,
            QueriesAnswered=self.query_server.answered if self.query_server else 0,
            RefusedQueries=self.query_server.refused if self.query_server else 0,
        )
        return c
