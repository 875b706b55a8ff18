"""Open an engine on a model file the way `run` does: resolved and planned here, then loaded."""

from __future__ import annotations

from pathlib import Path

from localrun.inference.engine import Engine
from localrun.inference.machine import this_machine
from localrun.inference.opening import EngineConfig, load_engine
from localrun.model.refs import parse_ref
from localrun.output import Output
from localrun.store.resolve import resolve


def open_engine(path: Path, n_ctx: int | None = None, n_gpu_layers: int | None = None, **config) -> Engine:
    resolved = resolve(parse_ref(str(path)), this_machine(), n_ctx)
    assert resolved is not None
    cfg = EngineConfig(n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, **config)
    return load_engine(resolved.model, resolved.plan, cfg, notify=Output().warn)
