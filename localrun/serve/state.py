"""What is being served, for `localrun ps`: one small file per server (and per worker lending its
devices) in $LOCALRUN_HOME/servers/,
written when it starts and removed when it stops. A server that died without removing it is
recognised (its pid is gone, or is another process now) and its file removed, never shown."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from localrun import paths

FOLDER = "servers"


@dataclass
class ServedModel:
    id: str
    slots: int


@dataclass
class ServerRecord:
    pid: int
    started: float  # the process's creation time (psutil): with the pid, it names this process
    url: str
    models: list[ServedModel] = field(default_factory=list)
    kind: str = "serve"  # or "worker": `localrun worker`, lending devices at rpc://HOST:PORT
    lends: list[str] = field(default_factory=list)  # a worker's devices, e.g. "CPU 7.7 GB"

    @classmethod
    def from_dict(cls, data: dict) -> ServerRecord:
        models = [ServedModel(str(m["id"]), int(m["slots"])) for m in data.get("models", [])]
        lends = [str(d) for d in data.get("lends", [])]
        return cls(
            int(data["pid"]), float(data["started"]), str(data["url"]), models, str(data.get("kind", "serve")), lends
        )


def _folder() -> Path:
    return paths.home() / FOLDER


def register(url: str, models: list[ServedModel], kind: str = "serve", lends: list[str] | None = None) -> ServerRecord:
    me = psutil.Process()
    record = ServerRecord(me.pid, me.create_time(), url, models, kind, list(lends or []))
    paths.write_json_quietly(_folder() / f"{me.pid}.json", asdict(record))
    return record


def unregister(record: ServerRecord) -> None:
    try:
        (_folder() / f"{record.pid}.json").unlink(missing_ok=True)
    except OSError:
        pass


def alive(record: ServerRecord) -> bool:
    """The process that wrote the record still runs (not just some process with its pid)."""
    try:
        return abs(psutil.Process(record.pid).create_time() - record.started) < 0.5
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def running() -> list[ServerRecord]:
    """The servers running now; the files of those that are not are removed."""
    found = []
    folder = _folder()
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        data = paths.read_json(path)
        try:
            record = ServerRecord.from_dict(data)
        except (TypeError, KeyError, ValueError):
            record = None
        if record is not None and alive(record):
            found.append(record)
        else:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
    return found
