"""A model split across machines: `localrun worker`s on loopback ports lend their devices through
llama.cpp's RPC backend, and `--rpc` puts layers on them. The same tokens as a local run; the
plan shows the split; a worker that cannot be reached, speaks another protocol version or dies
during a reply ends the command with one line naming it (exit 5), in bounded time."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from localrun.errors import ExitCode

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "tests"
PROMPT = "the old man and the sea"


def _rpc_build() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_rpc())


if not _rpc_build():
    reason = (
        "this llama-cpp-python was built without the RPC backend; reinstall as the README says "
        '(CMAKE_ARGS="-DGGML_RPC=ON" ... --no-cache-dir)'
    )
    if os.environ.get("LOCALRUN_CI") or os.environ.get("CI"):  # the README's install ran: RPC must be there
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def localrun(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "localrun", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


class WorkerProcess:
    """A running `localrun worker --port P`, read back from the endpoint it prints."""

    def __init__(self, *args: str, host: str = "127.0.0.1"):
        self.port = free_port()
        self.endpoint = f"{host}:{self.port}"
        argv = [sys.executable, "-m", "localrun", "worker", "--host", host, "--port", str(self.port), "--threads", "1"]
        argv += args
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> WorkerProcess:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == self.endpoint, self.proc.stderr.read() if self.proc.stderr else line
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def three_layers() -> Path:
    """A tiny model of three layers (Q8_0: the same CPU kernels here and on a worker): one each."""
    from localrun.inference.llama.build import quantize
    from localrun.model.tiny import TinySpec, write_tiny_model

    target = CACHE / "rpc" / "tiny-three-Q8_0.gguf"
    if not target.exists():
        base = write_tiny_model(target.with_name("base.gguf"), TinySpec(n_layer=3, name="tiny-three"))
        quantize(base, target, "Q8_0")
        base.unlink()
    return target


@pytest.fixture(scope="module")
def two_workers():
    with WorkerProcess() as a, WorkerProcess() as b:
        yield a, b


def test_a_model_split_across_two_workers_says_the_tokens_of_a_local_run(three_layers: Path, two_workers):
    a, b = two_workers
    ask = ["run", str(three_layers), PROMPT, "--temperature", "0", "--max-tokens", "40", "--ignore-eos"]
    local = localrun(*ask, "--json")
    assert local.returncode == 0, local.stderr
    split = localrun(*ask, "--json", "--rpc", f"{a.endpoint},{b.endpoint}")
    assert split.returncode == 0, split.stderr
    assert f"plan: 1 layer here, 1 on {a.endpoint}, 1 on {b.endpoint}" in split.stderr
    assert f"worker {a.endpoint}: 1 device" in split.stderr
    assert json.loads(split.stdout)["text"] == json.loads(local.stdout)["text"]
    assert json.loads(split.stdout)["generated_tokens"] == 40


def test_show_and_pull_plan_the_split_and_hw_lists_the_workers(three_layers: Path, two_workers, hub):
    a, b = two_workers
    env = dict(os.environ, LOCALRUN_RPC=f"{a.endpoint},{b.endpoint}")  # the variable, as --rpc
    shown = localrun("show", str(three_layers), "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    plan = json.loads(shown.stdout)["plan"]
    assert plan["placement"] == "split" and plan["fits"]
    assert [(s["where"], s["layers"]) for s in plan["split"]] == [("here", 1), (a.endpoint, 1), (b.endpoint, 1)]
    hub.add_repo("acme/three-GGUF", {"tiny-three-Q8_0.gguf": three_layers})
    pulled = localrun("pull", "acme/three-GGUF", "--dry-run", "--rpc", f"{a.endpoint},{b.endpoint}")
    assert pulled.returncode == 0, pulled.stderr
    assert f"1 here + 1 {a.endpoint} + 1 {b.endpoint}" in pulled.stdout  # the placement column
    assert "fits across this machine and its workers" in pulled.stdout
    hw = localrun("hw", "--no-selftest", "--rpc", f"{a.endpoint},{b.endpoint}")
    assert hw.returncode == 0, hw.stderr
    assert re.search(r"^RPC +yes", hw.stdout, re.M)
    for w in (a, b):
        line = next(line for line in hw.stdout.splitlines() if w.endpoint in line)
        assert "protocol 7.0.0, 1 device:" in line and "free of" in line


def test_bench_splits_each_quant_over_the_workers_and_says_so(three_layers: Path, two_workers):
    a, b = two_workers
    workers = f"{a.endpoint},{b.endpoint}"
    args = ["bench", str(three_layers), "--rpc", workers, "--no-quality", "--reps", "1", "--pp", "16", "--tg", "4"]
    done = localrun(*args, "--json", timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"plan: 1 layer here, 1 on {a.endpoint}, 1 on {b.endpoint}" in done.stderr
    report = json.loads(done.stdout)
    assert report["settings"]["workers"] == [a.endpoint, b.endpoint]
    assert report["candidates"][0]["tg"]["mean"] > 0
    shown = localrun(*args, timeout=300)  # the table's caption: where the layers ran, not "0 GPU layers"
    assert shown.returncode == 0, shown.stderr
    assert f"layers split with 2 workers ({a.endpoint}, {b.endpoint})" in shown.stdout
    assert "GPU layers" not in shown.stdout


def test_an_unreachable_worker_is_one_line_naming_it(three_layers: Path):
    dead = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = localrun("run", str(three_layers), PROMPT, "--max-tokens", "4", "--rpc", dead, timeout=30)
    assert time.monotonic() - started < 20
    assert result.returncode == ExitCode.NETWORK
    assert result.stderr.startswith(f"error: worker {dead} refused the connection")
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_worker_of_another_protocol_version_is_refused_by_name(three_layers: Path):
    """A peer that answers the hello with protocol 6.1.0: llama.cpp's client would abort."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    endpoint = f"127.0.0.1:{server.getsockname()[1]}"

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(9 + 24)  # the hello: command, size, capabilities
            conn.sendall(struct.pack("<Q", 28) + bytes([6, 1, 0, 0]) + bytes(24))
            conn.recv(1)

    threading.Thread(target=answer, daemon=True).start()
    started = time.monotonic()
    result = localrun("run", str(three_layers), PROMPT, "--max-tokens", "4", "--rpc", endpoint, timeout=30)
    server.close()
    assert time.monotonic() - started < 20
    assert result.returncode == ExitCode.NETWORK
    assert f"error: worker {endpoint} speaks RPC protocol 6.1.0; this llama.cpp speaks 7.0" in result.stderr


def test_a_worker_that_does_not_answer_is_given_up_on_in_seconds(three_layers: Path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()  # accepted by the kernel, never answered: a worker busy with another client
    endpoint = f"127.0.0.1:{server.getsockname()[1]}"
    started = time.monotonic()
    result = localrun("run", str(three_layers), PROMPT, "--max-tokens", "4", "--rpc", endpoint, timeout=30)
    server.close()
    assert time.monotonic() - started < 20
    assert result.returncode == ExitCode.NETWORK
    assert f"error: worker {endpoint} accepted the connection but did not answer within 3 s" in result.stderr


def test_a_worker_killed_mid_reply_ends_the_run_with_one_line(three_layers: Path):
    with WorkerProcess() as a, WorkerProcess() as b:
        argv = [sys.executable, "-m", "localrun", "run", str(three_layers), PROMPT, "--temperature", "0"]
        argv += ["--max-tokens", "1800", "--ignore-eos", "--speculate", "off", "--rpc", f"{a.endpoint},{b.endpoint}"]
        run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert run.stdout is not None and run.stderr is not None
        assert run.stdout.read(1), "the reply started"
        b.proc.kill()
        started = time.monotonic()
        try:
            run.wait(30)
        finally:
            if run.poll() is None:
                run.kill()
        stderr = run.stderr.read().decode()
        assert time.monotonic() - started < 30
        assert run.returncode == ExitCode.NETWORK, stderr
        assert f"error: worker {b.endpoint} stopped answering" in stderr, stderr
        assert "Remote RPC server crashed" not in stderr and "Aborted" not in stderr


def test_ctrl_c_stops_a_worker_and_ps_lists_it_while_it_runs():
    with WorkerProcess() as w:
        listed = localrun("ps", "--json")
        rows = json.loads(listed.stdout)["servers"]
        assert any(r["kind"] == "worker" and r["url"] == f"rpc://{w.endpoint}" and r["answering"] for r in rows)
        w.proc.send_signal(signal.SIGINT)
        assert w.proc.wait(10) == 0
        assert "worker stopped" in (w.proc.stderr.read() if w.proc.stderr else "")
    assert not any(r["kind"] == "worker" for r in json.loads(localrun("ps", "--json").stdout)["servers"])


def test_a_worker_beyond_loopback_warns_and_sigterm_stops_it():
    with WorkerProcess(host="0.0.0.0") as w:
        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.wait(10) == 0
        stderr = w.proc.stderr.read() if w.proc.stderr else ""
    assert "warning: the worker listens beyond this machine: RPC has no authentication" in stderr
    assert "private network" in stderr and "SSH tunnel" in stderr


def test_a_worker_refuses_a_busy_port_and_an_unknown_device():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        busy = localrun("worker", "--port", port, timeout=30)
    assert busy.returncode == 1 and busy.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
    unknown = localrun("worker", "--port", str(free_port()), "--devices", "NOPE", timeout=30)
    assert unknown.returncode == ExitCode.USAGE
    assert unknown.stderr.startswith("error: no device named NOPE here") and "CPU" in unknown.stderr


@pytest.mark.slow
def test_gemma_split_three_ways_gives_the_logits_of_a_local_run(gemma: Path, two_workers):
    """The real model across here and two workers, with the same CPU kernels everywhere (no
    repacked weights here, as on a worker): the same tokens, the same log-probabilities."""
    a, b = two_workers
    env = dict(os.environ, LOCALRUN_EXTRA_BUFTS="0")
    ask = ["run", str(gemma), "Name three rivers of Europe.", "--temperature", "0", "--max-tokens", "24"]
    ask += ["--json", "--logprobs", "2", "--no-prompt-cache", "--speculate", "off"]
    local = localrun(*ask, timeout=300, env=env)
    assert local.returncode == 0, local.stderr
    split = localrun(*ask, "--rpc", f"{a.endpoint},{b.endpoint}", timeout=300, env=env)
    assert split.returncode == 0, split.stderr
    shares = re.search(r"plan: (\d+) layers here, (\d+) on \S+, (\d+) on \S+", split.stderr)
    assert shares and all(int(n) > 0 for n in shares.groups()) and sum(map(int, shares.groups())) == 18
    mine, theirs = json.loads(local.stdout), json.loads(split.stdout)
    assert theirs["text"] == mine["text"]
    for here, there in zip(mine["logprobs"], theirs["logprobs"]):
        assert there["logprob"] == pytest.approx(here["logprob"], abs=1e-4)
