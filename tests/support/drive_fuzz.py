"""Feed seeded mutants of a tiny GGUF model to `show` and `run` in one process, one JSON line per
mutant. Run as a child: a llama.cpp abort kills it (the parent sees the signal and the last
mutant printed). Usage: python drive_fuzz.py MODEL FOLDER COUNT SEED"""

from __future__ import annotations

import json
import random
import struct
import sys
from pathlib import Path

import psutil
from typer.testing import CliRunner

from localrun.cli import app

runner = CliRunner()


def mutate(data: bytes, rng: random.Random, header_end: int) -> bytes:
    """Damage the header, where llama.cpp and localrun read: flipped bytes, a length or count
    made huge, a value made negative or zero, or the file cut short."""
    out = bytearray(data)
    kind = rng.choice(("flip", "flip", "u64", "u32", "cut"))
    at = rng.randrange(4, header_end - 8)
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(4, header_end)] ^= 1 << rng.randrange(8)
    elif kind == "u64":
        out[at : at + 8] = struct.pack("<Q", rng.choice((0, 1, 2**31, 2**32 - 1, 2**40, 2**63 - 1, 60 << 20)))
    elif kind == "u32":
        out[at : at + 4] = struct.pack("<I", rng.choice((0, 1, 2**31, 0xFFFFFFFF, 0xBF800000)))  # 0xBF800000: -1.0f
    else:
        del out[rng.randrange(at, len(out)) :]
    return bytes(out)


def main() -> int:
    source, folder, count, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    data = source.read_bytes()
    header_end = min(len(data), 64 * 1024)
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    proc = psutil.Process()
    for i in range(count):
        path = folder / f"mutant-{i:04d}-Q8_0.gguf"
        path.write_bytes(mutate(data, rng, header_end))
        show = runner.invoke(app, ["show", str(path), "--json"])
        problem = json.loads(show.stdout).get("problem") if show.exit_code == 0 else None
        run = runner.invoke(app, ["run", str(path), "--raw", "-n", "1", "--temp", "0", "hi"])
        sys.stdout.write(
            json.dumps(
                {
                    "mutant": i,
                    "show": show.exit_code,
                    "show_err": show.stderr,
                    "problem": problem,
                    "run": run.exit_code,
                    "run_err": run.stderr,
                    "rss": proc.memory_info().rss,
                }
            )
            + "\n"
        )
        sys.stdout.flush()
        path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
