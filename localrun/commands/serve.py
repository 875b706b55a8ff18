"""`localrun serve`: resolve and load the models (pulling first if needed), then answer OpenAI's
and Ollama's APIs on HTTP until Ctrl-C or SIGTERM, which end the streams in flight and exit 0."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from localrun.commands.loading import checked_config, draft_beside, resolve_or_pull
from localrun.commands.stream import stats_line
from localrun.errors import NotFound, UsageError
from localrun.hub.download import DownloadProgress
from localrun.inference.machine import this_machine
from localrun.inference.opening import EngineConfig
from localrun.model import aliases
from localrun.model.refs import ModelRef, parse_ref
from localrun.output import MESSAGE_LIMIT, Output
from localrun.serve import state
from localrun.serve.app import Access, create_app
from localrun.serve.generating import Served
from localrun.serve.host import ModelHost, ServeOptions
from localrun.serve.registry import ModelChanges, Registry
from localrun.serve.server import Limits, bind, is_loopback, serve, url_of
from localrun.store.resolve import Resolved, aliases_of, resolve
from localrun.store.scan import scan
from localrun.text import duration_seconds, safe


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_body: int = 16 << 20
    allowed_hosts: tuple[str, ...] = ()
    cors: tuple[str, ...] = ()
    allow_model_changes: bool = False  # Ollama's /api/pull and /api/delete may change what is on disk
    idle_timeout: float = Limits.idle
    body_timeout: float = Access.body_timeout
    max_connections: int = Limits.connections


def keep_alive(text: str) -> float | None:
    """`5m`, `30s`, `1h30m`, `300` (seconds), `0` (unload when idle); `forever` or -1: never unload."""
    value = text.strip().lower()
    if value in ("forever", "never", "inf"):
        return None
    try:
        return duration_seconds(value)
    except ValueError:
        raise UsageError(
            f"--keep-alive {safe(text)!r} is not a duration", hint="e.g. 30s, 5m, 1h, 0, or forever"
        ) from None


def _model_id(resolved: Resolved, ref: ModelRef) -> tuple[str, set[str]]:
    """The name clients use (a local file: its name without .gguf; a pulled model: org/repo:QUANT)
    and the other names that reach it."""
    model = resolved.model
    if ref.is_local:
        stem = model.path.name.removesuffix(".gguf")
        names = {ref.raw, model.path.name, *_aliases_naming(model.path, ref)}
        quant = model.quant or ""
        if (
            quant
            and len(stem) > len(quant) + 1
            and stem[-len(quant) - 1] in "-._"
            and stem.lower().endswith(quant.lower())
        ):
            names.add(f"{stem[: -len(quant) - 1]}:{stem[-len(quant) :]}")  # Ollama's name:tag: tiny-llama:Q8_0
        return stem, names
    names = {ref.raw, model.label, *_aliases_naming(model.label, ref)}
    if model.repo_id:  # the repo, and an alias of the repo, reach the quant served (as without names)
        names |= {model.repo_id, *_aliases_naming(model.repo_id, ref)}
    return model.label, names


def _host(resolved: Resolved, ref: ModelRef, opts: ServeOptions, out: Output) -> ModelHost:
    model_id, names = _model_id(resolved, ref)
    return ModelHost(model_id, names, lambda: resolved, lambda: this_machine(), opts, notify=server_log(out))


def model_changes(opts: ServeOptions, out: Output) -> ModelChanges:
    """Pulling and deleting models while serving (--allow-model-changes): a pull as `localrun pull`
    makes it (its table and notes on the server's log), served at once; a delete as `localrun rm
    --yes` makes it."""
    from localrun.commands.pull import pull  # the Hub client: only when a pull is asked for
    from localrun.store.remove import plan_removal, remove

    def pull_one(name: str, progress: DownloadProgress) -> ModelHost:
        ref = parse_ref(name)
        if ref.is_local:
            raise UsageError(f"{safe(name)} is a path: a pull takes a Hub repo (org/repo[:QUANT])")
        resolved = pull(ref, out, machine=this_machine(), as_step=True, progress=progress).resolved
        assert resolved is not None, "a pull that returns ends with the files on disk"
        return _host(resolved, ref, opts, out)

    def delete_one(host: ModelHost) -> list[str]:
        # the served model's own place in the cache: never its name read again (an alias of yours
        # by that name would stand for another model)
        model = host.described().model
        if model.repo_id is None:
            raise UsageError(f"{safe(host.id)} is a file named when the server started: not the server's to delete")
        plan = plan_removal(parse_ref(model.label, expand=False))
        remove(plan)
        return [e.label for e in plan.entries]

    return ModelChanges(pull_one, delete_one)


def _aliases_naming(target: Path | str, ref: ModelRef) -> set[str]:
    """The aliases of your own that stand for this model, as the served-by-name models take
    them too (a pulled model's aliases come from the cache scan, `aliases_of`)."""
    found = set()
    for name, value in aliases.load().items():
        if isinstance(target, Path):
            if Path(value).expanduser().resolve() == target.resolve():
                found.add(name)
        elif value in (target, ref.raw):
            found.add(name)
    return found


def hosts_for(models: list[str], opts: ServeOptions, out: Output, draft: str | None = None) -> list[ModelHost]:
    """A host per model named (resolved now, pulled first if needed), or, with none named, every
    pulled model, each loaded by the first request for it. A `draft` model drafts for the one
    model named, when it fits beside it."""
    machine = this_machine(out.info)
    hosts: list[ModelHost] = []
    if draft is not None and len(models) != 1:
        raise UsageError("--draft drafts for one model: name exactly one MODEL to serve with it")
    if models:
        for reference in models:
            ref = parse_ref(reference)
            resolved = resolve_or_pull(ref, out, machine=machine)
            if draft is not None:
                opts.draft = draft_beside(draft, resolved, opts.generation(), machine, out)
            host = _host(resolved, ref, opts, out)
            if any(h.id == host.id for h in hosts):
                raise UsageError(f"{safe(reference)} is named twice")
            hosts.append(host)
        return hosts
    seen: set[str] = set()
    for entry in scan().entries:
        if not entry.loadable or entry.label in seen:
            continue
        seen.add(entry.label)

        def source(label: str = entry.label) -> Resolved:
            found = resolve(parse_ref(label), this_machine())
            if found is None:
                raise NotFound(f"{label} is no longer in the cache", hint=f"`localrun pull {label}`")
            return found

        names = {entry.repo_id, *aliases_of(entry)}  # an alias of the repo reaches its first quant, as the repo does
        hosts.append(ModelHost(entry.label, names, source, lambda: this_machine(), opts, notify=server_log(out)))
    if not hosts:
        raise UsageError("nothing to serve: no model is pulled", hint="name one: `localrun serve org/repo`")
    return hosts


def stamped(message: str, when: float | None = None) -> str:
    """A line of the server's log: the local time first."""
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))} {message}"


def server_log(out: Output) -> Callable[[str], None]:
    """Where the server's events go (a model loaded or unloaded, a request served): one
    timestamped line each on stderr, never wrapped by localrun."""
    return lambda message: out.line(stamped(message))


def log_line(served: Served) -> str:
    """One line per request: what, for which model, the status sent, and how it went. Nothing in
    it is cut: it is a record, and the terminal wraps it."""
    head = f"{safe(served.endpoint, MESSAGE_LIMIT)} {safe(served.model, MESSAGE_LIMIT)} {served.status}"
    parts = [head]
    if served.stats is not None:
        parts.append(stats_line(served.stats))
    if served.error and served.status < 400:  # a stream began with 200, then the error came in-band
        parts.append(f"cut short: {safe(served.error, MESSAGE_LIMIT)}")
    elif served.error:
        parts.append(safe(served.error, MESSAGE_LIMIT))
    elif served.detail:
        parts.append(safe(served.detail, MESSAGE_LIMIT))
    elif served.status == 499:
        parts.append("the client went away")
    return " · ".join(parts)


def run_server(
    models: list[str],
    opts: ServeOptions,
    settings: ServeSettings,
    cfg: EngineConfig,
    out: Output,
    *,
    draft: str | None = None,
) -> int:
    """Serve until stopped; the exit code (0 when stopped by Ctrl-C or SIGTERM)."""
    if opts.parallel < 1:
        raise UsageError("--parallel must be at least 1")
    checked = checked_config(cfg, out)
    opts.threads, opts.gpu_layers = checked.n_threads, checked.n_gpu_layers
    loopback = is_loopback(settings.host)
    if not loopback and not settings.api_key:
        out.warn(
            f"serving on {settings.host} without --api-key: anyone who can reach this machine can use the models "
            "(set LOCALRUN_API_KEY, or --api-key KEY)"
        )
    sock = bind(settings.host, settings.port)  # before loading: a port in use is said at once
    try:
        hosts = hosts_for(models, opts, out, draft)
        if models:
            for host in hosts:  # loaded now, so the first request pays no cold load
                host.checkout()
                host.checkin()
        registry = Registry(hosts, model_changes(opts, out) if settings.allow_model_changes else None)
        access = Access(
            api_key=settings.api_key,
            max_body=settings.max_body,
            body_timeout=settings.body_timeout,
            loopback=loopback,
            allowed_hosts=settings.allowed_hosts,
            cors=settings.cors,
        )
        app = create_app(registry, access, log=lambda s: server_log(out)(log_line(s)))
        url = url_of(sock, settings.host)
        record = state.register(url, [state.ServedModel(h.id, opts.parallel) for h in hosts])
    except BaseException:
        sock.close()
        raise
    try:
        _announce(out, url, hosts, opts, bool(models), bool(settings.api_key))
        limits = Limits(settings.idle_timeout, settings.max_connections)
        serve(app, sock, on_stop=registry.drain, limits=limits, notify=server_log(out))
        server_log(out)("stopped")
    finally:
        registry.drain()
        registry.close()
        state.unregister(record)
    return 0


def _announce(out: Output, url: str, hosts: list[ModelHost], opts: ServeOptions, loaded: bool, key: bool) -> None:
    out.text(f"{url}/v1\n")  # the one line of data: scripts read the URL from stdout
    first = hosts[0]
    if loaded:
        names = ", ".join(f"{safe(h.id)} ({opts.parallel} slots × {h.n_ctx_slot} tokens)" for h in hosts)
    else:
        names = f"{len(hosts)} pulled model{'s' * (len(hosts) > 1)}, each loaded by its first request"
    keep = "never unloaded" if opts.keep_alive is None else f"unloaded after {opts.keep_alive:g} s idle"
    out.info(
        f"serving {names} at {url}/v1 (OpenAI's and Anthropic's APIs; Ollama's at {url}/api; {keep}); Ctrl-C stops"
    )
    example = (
        f'{{"model": "{first.id}", "messages": [{{"role": "user", "content": "Hello"}}], "stream": true}}'
    ).replace("'", "'\\''")
    auth = " -H 'Authorization: Bearer YOUR_KEY'" if key else ""
    out.line(f"try: curl -N {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' -d '{example}'")
