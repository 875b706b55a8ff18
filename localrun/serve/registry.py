"""The models a server answers for, found by the names clients send."""

from __future__ import annotations

from localrun.errors import NoSpace
from localrun.serve.errors import ApiError
from localrun.serve.host import ModelHost
from localrun.serve.loop import SlotLoop
from localrun.serve.protocol import Health, ModelCard, ModelList


class Registry:
    def __init__(self, hosts: list[ModelHost]):
        self.hosts = hosts
        self.stopping = False
        self._names: dict[str, ModelHost] = {}
        for host in hosts:  # the first model to claim a name keeps it
            for name in sorted(host.aliases):
                self._names.setdefault(name.lower(), host)

    def find(self, name: str) -> ModelHost:
        host = self._names.get(name.lower())
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

    def drain(self) -> None:
        """End every request in flight (streams get an error event, then [DONE]); refuse new ones."""
        self.stopping = True
        for host in self.hosts:
            host.drain()

    def close(self) -> None:
        """Free every model: once no request is left (after the HTTP server has stopped)."""
        for host in self.hosts:
            host.close()
