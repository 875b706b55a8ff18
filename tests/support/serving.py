"""`localrun serve` for tests: the real command in a child process on a random loopback port,
read back from the URL it prints, driven by the real `openai` client."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import openai

START_TIMEOUT = 180.0  # a first load checks the build and the file in child processes


class ServerProcess:
    """A running `localrun serve MODEL... --port 0 ARGS`; use as a context manager."""

    def __init__(self, models: list[str | Path], *args: str, env: dict[str, str] | None = None, api_key: str = ""):
        self.argv = [sys.executable, "-m", "localrun", "serve", *map(str, models), "--port", "0", *args]
        self.env = dict(os.environ if env is None else env)
        self.env.pop("LOCALRUN_API_KEY", None)
        if api_key:
            self.env["LOCALRUN_API_KEY"] = api_key  # as a user would: the key never shows in `ps`
        self.api_key = api_key
        fd, name = tempfile.mkstemp(prefix="localrun-serve-", suffix=".log")
        os.close(fd)
        self.log = Path(name)  # stderr goes to a file: a pipe nobody reads would block the server
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> ServerProcess:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=log, env=self.env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()  # the one line of data: the URL
        if not line.startswith("http://"):
            self.proc.wait(START_TIMEOUT)
            raise RuntimeError(f"the server did not start (exit {self.proc.returncode}):\n{self.stderr}")
        self.url = line.removesuffix("/v1")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop(signal.SIGTERM)
        self.log.unlink(missing_ok=True)

    @property
    def base(self) -> str:
        return f"{self.url}/v1"

    @property
    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def client(self, api_key: str | None = None, **kwargs) -> openai.OpenAI:
        """The official client; no retries, so a 503 is seen as it is."""
        key = self.api_key if api_key is None else api_key
        return openai.OpenAI(base_url=self.base, api_key=key or "unused", max_retries=0, **kwargs)

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=10) as response:
            return json.loads(response.read())

    def wait_for(self, condition: Callable[[dict], bool], timeout: float = 60.0) -> dict:
        """Poll /health until `condition` holds (a state to reach, not a time to measure)."""
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if condition(health):
                return health
            if time.monotonic() > deadline:
                raise AssertionError(f"the server never reached the state; last /health: {health}")
            time.sleep(0.02)

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
        """A raw request (for bodies the openai client would never send): status, headers, JSON."""
        request = urllib.request.Request(f"{self.url}{path}", data=body, method="POST")
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            request.add_header(key, value)
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, dict(response.headers), json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), json.loads(exc.read())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send `sig` and wait; the exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def fresh_env(session_home: Path, root: Path) -> dict[str, str]:
    """The environment of a server with a home of its own under `root` (a copy of the session's,
    which holds the build's checks) and an empty Hugging Face cache beside it."""
    shutil.copytree(session_home, root / "home", dirs_exist_ok=True)
    return isolated_env(root / "home", root / "hf")


def isolated_env(home: Path, hf_home: Path) -> dict[str, str]:
    """The environment of a server started outside a test's own fixtures (module-scoped)."""
    env = dict(os.environ)
    env.update(
        LOCALRUN_HOME=str(home),
        HF_HOME=str(hf_home),
        HF_HUB_CACHE=str(hf_home / "hub"),
        NO_COLOR="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "LOCALRUN_DEBUG", "LOCALRUN_EXTRA_BUFTS", "HF_ENDPOINT"):
        env.pop(var, None)
    return env
