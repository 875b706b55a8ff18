"""A server's Prometheus metrics (GET /metrics), kept with prometheus_client in a registry of the
app's own (never the library's global one: two apps in one process do not share figures).

They are fed from the points where the app already learns how a request ended: every request it
logs (each generation, with its Stats, and every error, whichever middleware or handler refused
it) and each quick route that answered (/health, /v1/models, ...). What the models are doing now
(slots busy, requests queued, loads) is read from their hosts at each scrape. Labels stay bounded
whatever clients send: a request's route is the template it matched (`/v1/models/{name:path}`,
or `unmatched` for any unknown path), its method one of HTTP's or `other`, a model one of those
served.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from starlette.routing import BaseRoute, Match

from localrun.inference.generation.events import Stats

if TYPE_CHECKING:
    from localrun.serve.generating import Served
    from localrun.serve.host import ModelHost

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
UNMATCHED = "unmatched"  # the route of a request whose path no route of the app matches
# Seconds: a time to first token spans a cached prompt on a GPU to a long one read on a CPU; a
# token's time, a small model's few ms to a big one's second.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """The figures of one app; `exposition()` is what GET /metrics answers."""

    def __init__(self, hosts: Callable[[], Sequence[ModelHost]], routes: Sequence[BaseRoute]):
        self.hosts = hosts  # the models served now (a pull adds one, a delete takes one away)
        self.routes = routes  # the app's own list: routes added later are matched too
        self.registry = CollectorRegistry()
        reg = self.registry
        by_model = ["model"]
        self.requests = Counter(
            "localrun_http_requests",
            "HTTP requests answered, by method, route template and the status sent",
            ["method", "route", "status"],
            registry=reg,
        )
        self.prompt_tokens = Counter(
            "localrun_prompt_tokens", "Prompt tokens of requests served", by_model, registry=reg
        )
        self.generated_tokens = Counter(
            "localrun_generated_tokens", "Tokens generated (usage.completion_tokens)", by_model, registry=reg
        )
        self.reused_tokens = Counter(
            "localrun_reused_prompt_tokens",
            "Prompt tokens not decoded: reused from a slot's KV cache (source=slot) or read from the "
            "prompt cache on disk (source=disk)",
            ["model", "source"],
            registry=reg,
        )
        self.disk_hits = Counter(
            "localrun_prompt_cache_hits",
            "Requests whose prompt began with a prefix read from disk",
            by_model,
            registry=reg,
        )
        self.drafted = Counter(
            "localrun_speculative_drafted_tokens",
            "Speculative decoding: tokens drafted and verified",
            by_model,
            registry=reg,
        )
        self.accepted = Counter(
            "localrun_speculative_accepted_tokens",
            "Speculative decoding: drafted tokens accepted",
            by_model,
            registry=reg,
        )
        self.ttft = Histogram(
            "localrun_time_to_first_token_seconds",
            "From a request's arrival at its model to the first text of its reply",
            by_model,
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.token_time = Histogram(
            "localrun_time_per_output_token_seconds",
            "Each reply's mean time per generated token, after its prompt was read",
            by_model,
            buckets=TOKEN_BUCKETS,
            registry=reg,
        )
        reg.register(_HostCollector(hosts))

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def counting(self, log: Callable[[Served], None]) -> Callable[[Served], None]:
        """`log`, with each request it is given counted first."""

        def counted(served: Served) -> None:
            self.request(served.endpoint, served.status)
            if served.stats is not None:
                self.generation(served.model, served.stats)
            log(served)

        return counted

    def request(self, endpoint: str, status: int) -> None:
        """A request answered: `endpoint` is its method and path ("POST /v1/chat/completions")."""
        method, _, path = endpoint.partition(" ")
        method = method.upper() if method.upper() in METHODS else "other"
        self.requests.labels(method, self.route(method, path), str(status)).inc()

    def route(self, method: str, path: str) -> str:
        """The template of the app's route that `path` names (whatever the method), else UNMATCHED."""
        scope = {"type": "http", "method": method, "path": path, "root_path": ""}
        for candidate in self.routes:
            match, _ = candidate.matches(scope)
            if match is not Match.NONE:
                return getattr(candidate, "path", UNMATCHED)
        return UNMATCHED

    def generation(self, model: str, stats: Stats) -> None:
        """A reply's figures, for the model that generated it."""
        if model not in {host.id for host in self.hosts()}:
            return
        self.prompt_tokens.labels(model).inc(stats.prompt_tokens)
        self.generated_tokens.labels(model).inc(stats.generated_tokens)
        self.reused_tokens.labels(model, "slot").inc(stats.cached_tokens - stats.from_disk)
        self.reused_tokens.labels(model, "disk").inc(stats.from_disk)
        if stats.from_disk:
            self.disk_hits.labels(model).inc()
        self.drafted.labels(model).inc(stats.drafted)
        self.accepted.labels(model).inc(stats.accepted)
        if stats.ttft_s is not None:
            self.ttft.labels(model).observe(stats.ttft_s)
        if stats.gen_tps > 0:
            self.token_time.labels(model).observe(1.0 / stats.gen_tps)


class _HostCollector:
    """What each served model is doing at the moment of a scrape, read from its host."""

    def __init__(self, hosts: Callable[[], Sequence[ModelHost]]):
        self.hosts = hosts

    def collect(self) -> Iterator[Metric]:
        loaded = GaugeMetricFamily("localrun_model_loaded", "1 while the model is loaded", labels=["model"])
        slots = GaugeMetricFamily("localrun_slots", "Slots (requests run at once) per model", labels=["model"])
        busy = GaugeMetricFamily("localrun_slots_busy", "Slots running a request", labels=["model"])
        queued = GaugeMetricFamily("localrun_queued_requests", "Requests waiting for a free slot", labels=["model"])
        loads = CounterMetricFamily("localrun_model_loads", "Times the model was loaded", labels=["model"])
        load_time = SummaryMetricFamily("localrun_model_load_seconds", "Time the model's loads took", labels=["model"])
        for host in self.hosts():
            status = host.status()
            loaded.add_metric([host.id], int(status.loaded))
            slots.add_metric([host.id], status.slots)
            busy.add_metric([host.id], status.busy)
            queued.add_metric([host.id], status.queued)
            loads.add_metric([host.id], host.loads)
            load_time.add_metric([host.id], host.loads, host.load_seconds)
        yield from (loaded, slots, busy, queued, loads, load_time)
