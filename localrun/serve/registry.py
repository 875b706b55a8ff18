"""The models a server answers for, found by the names clients send; and, when the server was
started with --allow-model-changes, models pulled (served at once) and deleted while it runs."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from localrun.errors import LocalrunError, NoSpace
from localrun.hub.download import DownloadProgress
from localrun.model.refs import without_hub_prefix
from localrun.serve.errors import ApiError, from_localrun
from localrun.serve.host import ModelHost
from localrun.serve.loop import SlotLoop
from localrun.serve.protocol import Health, ModelCard, ModelList


@dataclass
class ModelChanges:
    """What a server started with --allow-model-changes may do to the models on disk: pull one (a
    name as `localrun pull` takes it; the host that serves it once it is on disk), and delete one
    (a served model pulled into the cache; the labels removed)."""

    pull: Callable[[str, DownloadProgress], ModelHost]
    delete: Callable[[ModelHost], list[str]]


class Registry:
    def __init__(self, hosts: list[ModelHost], changes: ModelChanges | None = None):
        self.hosts = list(hosts)
        self.changes = changes  # None: the models on disk are not the server's to change
        self.stopping = False
        self._lock = threading.Lock()
        self._retired: list[ModelHost] = []  # deleted while in use: unloaded once idle
        self._names: dict[str, ModelHost] = {}
        self._index()

    def _index(self) -> None:
        names: dict[str, ModelHost] = {}
        for host in self.hosts:  # the first model to claim a name keeps it
            for name in sorted(host.aliases):
                names.setdefault(name.lower(), host)
        self._names = names

    def add(self, host: ModelHost) -> ModelHost:
        """Serve one more model (a pull's); the one already served under its id, if any."""
        with self._lock:
            for served in self.hosts:
                if served.id == host.id:
                    return served
            self.hosts = [*self.hosts, host]  # a new list: a sweep going through the old one is not disturbed
            self._index()
            return host

    def retire(self, host: ModelHost) -> None:
        """Stop answering for a model (its files were deleted): unloaded now if idle, else once it is."""
        with self._lock:
            self.hosts = [h for h in self.hosts if h is not host]
            self._index()
            if not host.unload_if_idle(force=True) and host.scheduler is not None:
                self._retired.append(host)

    def find(self, name: str) -> ModelHost:
        host = self._names.get(name.lower())
        if host is None:  # Ollama's names: hf.co/org/repo:tag, and a name without a tag is name:latest
            key = without_hub_prefix(name).lower()
            host = self._names.get(key) or self._names.get(key.removesuffix(":latest"))
        if host is None:
            served = ", ".join(h.id for h in self.hosts[:8]) + (" ..." if len(self.hosts) > 8 else "")
            raise ApiError(
                404,
                f"the model {name!r} is not served here (served: {served or 'none'}; GET /v1/models lists them)",
                code="model_not_found",
                param="model",
            )
        return host

    def checkout(self, host: ModelHost) -> SlotLoop:
        """host.checkout(); when memory runs out loading it, idle models are unloaded and it tries again."""
        try:
            return host.checkout()
        except NoSpace:
            freed = [other for other in self.hosts if other is not host and other.unload_if_idle(force=True)]
            if not freed:
                raise
            return host.checkout()

    async def acquire(self, host: ModelHost) -> SlotLoop:
        """checkout() from a request: at once when the model is ready, else in a worker thread (it
        may load); a failure is the ApiError a client gets. Give it back with host.checkin()."""
        try:
            return host.checkout_now() or await run_in_threadpool(self.checkout, host)
        except LocalrunError as exc:
            raise from_localrun(exc) from None

    @contextlib.asynccontextmanager
    async def holding(self, host: ModelHost) -> AsyncIterator[SlotLoop]:
        """The model checked out (loaded, and not unloaded) while the block runs."""
        loop = await self.acquire(host)
        try:
            yield loop
        finally:
            host.checkin()

    def cards(self) -> ModelList:
        return ModelList(data=[ModelCard(id=h.id, created=h.created) for h in self.hosts])

    def card(self, name: str) -> ModelCard:
        host = self.find(name)
        return ModelCard(id=host.id, created=host.created)

    def health(self) -> Health:
        return Health(status="stopping" if self.stopping else "ok", models=[h.status() for h in self.hosts])

    def sweep(self) -> None:
        """Unload the models whose file changed on disk, and those idle for longer than --keep-alive."""
        for host in self.hosts:
            host.unload_if_changed() or host.unload_if_idle()
        for host in list(self._retired):
            if host.unload_if_idle(force=True) or host.scheduler is None:
                self._retired.remove(host)

    def drain(self) -> None:
        """End every request in flight (streams get an error event, then [DONE]); refuse new ones."""
        self.stopping = True
        for host in (*self.hosts, *self._retired):
            host.drain()

    def close(self) -> None:
        """Free every model: once no request is left (after the HTTP server has stopped)."""
        for host in (*self.hosts, *self._retired):
            host.close()
