"""`localrun ps`: the servers and workers running on this machine (from their state files), each asked how
busy it is; a server that died is not listed, whatever it left behind."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import psutil

from localrun import workers
from localrun.output import Output
from localrun.serve import client, state
from localrun.text import human_bytes, safe


@dataclass
class ModelRow:
    id: str
    loaded: bool | None  # None: the server did not answer
    slots: int
    busy: int | None
    queued: int | None
    ctx_per_slot: int | None


@dataclass
class ServerRow:
    pid: int
    url: str
    uptime_s: float
    memory: int | None  # resident memory of the process, bytes
    answering: bool
    models: list[ModelRow] = field(default_factory=list)
    kind: str = "serve"  # or "worker"
    lends: list[str] = field(default_factory=list)  # a worker's devices

    def to_dict(self) -> dict:
        return asdict(self)


def servers() -> list[ServerRow]:
    rows = []
    for record in state.running():
        try:
            memory: int | None = psutil.Process(record.pid).memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            memory = None
        if record.kind == "worker":
            up = not workers.gone(record.url.removeprefix("rpc://"))
            rows.append(
                ServerRow(record.pid, record.url, time.time() - record.started, memory, up, [], "worker", record.lends)
            )
            continue
        live = client.health(record.url)
        by_id = {m["id"]: m for m in (live or {}).get("models", []) if isinstance(m, dict) and "id" in m}
        models = []
        for m in record.models:
            now = by_id.get(m.id, {})
            models.append(
                ModelRow(m.id, now.get("loaded"), m.slots, now.get("busy"), now.get("queued"), now.get("ctx_per_slot"))
            )
        rows.append(ServerRow(record.pid, record.url, time.time() - record.started, memory, live is not None, models))
    return rows


def _uptime(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def show(out: Output, rows: list[ServerRow]) -> None:
    if out.json:
        out.data({"servers": [r.to_dict() for r in rows]})
        return
    if not rows:
        out.info("no localrun server or worker is running (start one with `localrun serve MODEL`)")
        return
    lines = []
    for row in rows:
        memory = human_bytes(row.memory) if row.memory is not None else "?"
        if row.kind == "worker":
            what = "worker: " + (", ".join(row.lends) or "?")
            busy = "lending" if row.answering else "not answering"
            lines.append([safe(what), safe(row.url), str(row.pid), busy, "-", memory, _uptime(row.uptime_s)])
            continue
        for i, m in enumerate(row.models or [ModelRow("-", None, 0, None, None, None)]):
            if not row.answering:
                busy, queued = "not answering", "?"
            elif not m.loaded:
                busy, queued = f"not loaded ({m.slots} slots)", "-"
            else:
                busy, queued = f"{m.busy}/{m.slots}", str(m.queued)
            first = i == 0
            lines.append(
                [
                    safe(m.id),
                    safe(row.url) if first else "",
                    str(row.pid) if first else "",
                    busy,
                    queued,
                    memory if first else "",
                    _uptime(row.uptime_s) if first else "",
                ]
            )
    # the model first, whole: the name is what you type next (as in list)
    out.columns(["MODEL", "URL", "PID", "SLOTS BUSY", "QUEUED", "MEMORY", "UP"], lines, right=("MEMORY",))
