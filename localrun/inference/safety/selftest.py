"""Self-test of the installed llama.cpp build on this CPU, run in a child process.

Some builds crash instead of returning an error: a native build on CPUs with AMX segfaults in
ggml_backend_amx_mul_mat at the first decode (llama.cpp#20824, ollama#17205). We probe a tiny
model in a subprocess once per (llama.cpp build, CPU); if the fast path dies and the path
without extra buffer types (use_extra_bufts=False, the same speed there) works, every later
load uses the safe path. The verdict is kept in $LOCALRUN_HOME/probe.json.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from localrun import paths
from localrun.errors import EngineCrash
from localrun.inference.llama.build import build_key, quantize
from localrun.inference.llama.log import last_error

PROBE_TIMEOUT = 120.0

REBUILD_HINT = (
    'rebuild llama-cpp-python without AMX: CMAKE_ARGS="-DGGML_RPC=ON -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON '
    '-DGGML_F16C=ON" pip install --force-reinstall --no-cache-dir llama-cpp-python'
)


@dataclass
class ProbeResult:
    ok: bool
    extra_bufts: bool
    returncode: int
    signal: str | None  # e.g. "SIGSEGV" when the child was killed by a signal
    detail: str  # generated text on success, llama.cpp's last words on failure
    seconds: float | None = None

    @property
    def crashed(self) -> bool:
        return self.signal is not None


@dataclass
class Verdict:
    """What the self-test concluded for one llama.cpp build on one CPU."""

    key: str
    use_extra_bufts: bool | None  # None: neither path works
    fast: ProbeResult
    safe: ProbeResult | None
    checked: str

    @property
    def ok(self) -> bool:
        return self.use_extra_bufts is not None

    def advice(self) -> str | None:
        if self.use_extra_bufts is False:
            return (
                "llama.cpp's fast CPU path (extra buffer types: AMX / weight repacking) crashed here "
                f"({self.fast.signal or 'exit ' + str(self.fast.returncode)}); localrun loads models with "
                "use_extra_bufts=False, which works. To fix the build itself, " + REBUILD_HINT
            )
        if self.use_extra_bufts is None:
            return (
                "the installed llama.cpp build cannot decode on this machine "
                f"({self.fast.signal or 'exit ' + str(self.fast.returncode)}, also without extra buffer types); "
                + REBUILD_HINT
            )
        return None


def signal_name(returncode: int) -> str | None:
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    if returncode in (134, 139):  # killed by SIGABRT/SIGSEGV inside a shell
        return signal.Signals(returncode - 128).name
    return None


def run_probe(
    model: str | os.PathLike[str],
    *,
    extra_bufts: bool = True,
    tokens: int = 8,
    command: Sequence[str] | None = None,
    timeout: float = PROBE_TIMEOUT,
) -> ProbeResult:
    """Load `model` and decode a few tokens in a child process; never crashes this process."""
    argv = [
        *(command or [sys.executable, "-m", "localrun.inference.safety.probe"]),
        str(model),
        "--tokens",
        str(tokens),
    ]
    if not extra_bufts:
        argv.append("--no-extra-bufts")
    try:
        # No gdb backtrace from ggml on an abort: it is slow and buries llama.cpp's reason.
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, errors="replace", env=env
        )
    except subprocess.TimeoutExpired:
        return ProbeResult(False, extra_bufts, -1, None, f"timed out after {timeout:.0f}s")
    sig = signal_name(proc.returncode)
    if proc.returncode == 0:
        try:
            data = json.loads(proc.stdout.strip().splitlines()[-1])
            return ProbeResult(True, extra_bufts, 0, None, data.get("text", ""), data.get("seconds"))
        except (ValueError, IndexError):
            return ProbeResult(
                False,
                extra_bufts,
                0,
                None,
                "probe printed no result: " + last_error(proc.stderr.splitlines(), or_last_line=True),
            )
    return ProbeResult(
        False, extra_bufts, proc.returncode, sig, last_error(proc.stderr.splitlines(), or_last_line=True)
    )


def probe_model() -> Path:
    """The tiny Q4_K_M model the self-test decodes (its matrices qualify for the AMX kernels)."""
    target = paths.home() / "probe" / "tiny-Q4_K_M.gguf"
    if target.exists():
        return target
    try:
        return _make_probe_model(target)
    except (OSError, RuntimeError):  # no room in $LOCALRUN_HOME (the quantizer fails too): a temporary one serves
        return _make_probe_model(Path(tempfile.mkdtemp(prefix="localrun-probe-")) / target.name)


def _make_probe_model(target: Path) -> Path:
    from localrun.model.tiny import write_tiny_model  # numpy and gguf: only when the probe is made

    base = write_tiny_model(target.with_name("tiny-f32.gguf"))
    try:
        quantize(base, target, "Q4_K_M")
    finally:
        base.unlink(missing_ok=True)
    return target


def _verdict_file() -> Path:
    return paths.home() / "probe.json"


def _load_verdicts() -> dict:
    data = paths.read_json(_verdict_file())
    return data if isinstance(data, dict) else {}


def check(
    model: str | os.PathLike[str] | None = None, *, command: Sequence[str] | None = None, key: str | None = None
) -> Verdict:
    """Run the probe (fast path, then the safe path if the fast one fails) and remember the verdict."""
    key = key or build_key()
    model = model or probe_model()
    fast = run_probe(model, extra_bufts=True, command=command)
    safe = None
    use: bool | None = True
    if not fast.ok:
        safe = run_probe(model, extra_bufts=False, command=command)
        use = False if safe.ok else None
    verdict = Verdict(key, use, fast, safe, datetime.now(timezone.utc).isoformat(timespec="seconds"))
    verdicts = _load_verdicts()
    verdicts[key] = {
        "use_extra_bufts": use,
        "checked": verdict.checked,
        "fast": asdict(fast),
        "safe": asdict(safe) if safe else None,
    }
    paths.write_json_quietly(_verdict_file(), verdicts, indent=2)  # unwritable: probed again next time
    return verdict


def cached_verdict(key: str) -> Verdict | None:
    entry = _load_verdicts().get(key)
    if not entry:
        return None
    safe = ProbeResult(**entry["safe"]) if entry.get("safe") else None
    return Verdict(key, entry["use_extra_bufts"], ProbeResult(**entry["fast"]), safe, entry["checked"])


def use_extra_bufts(notify: Callable[[str], None] | None = None) -> bool:
    """Whether model loads may use extra buffer types here. Probes once per build and CPU.

    LOCALRUN_EXTRA_BUFTS=0/1 overrides the verdict. `notify(message)` is told when a probe runs
    and when the safe path is in force.
    """
    override = os.environ.get("LOCALRUN_EXTRA_BUFTS")
    if override in ("0", "1"):
        return override == "1"
    key = build_key()
    verdict = cached_verdict(key)
    if verdict is None:
        if notify:
            notify("checking the llama.cpp build on this CPU (once per build)...")
        verdict = check(key=key)
        if notify and verdict.advice():
            notify(verdict.advice())
    if verdict.use_extra_bufts is None:
        raise EngineCrash(
            "the llama.cpp build crashes on this machine: " + verdict.fast.detail[-200:], hint=REBUILD_HINT
        )
    return verdict.use_extra_bufts
