"""Serve the tiny models through the Hub emulator, for trying `localrun pull` by hand.

Usage: python scripts/hub_emulator.py   then, in another shell, export the HF_ENDPOINT it prints.
Repos: tiny/tiny-llama-GGUF (every quant, a split model, an mmproj), tiny/gated-GGUF (token hf_testtoken).
"""

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' Hub emulator and model builder

from support.hub import HubEmulator  # noqa: E402
from support.models import build_suite  # noqa: E402

suite = build_suite(Path(__file__).resolve().parents[1] / ".cache" / "tests" / "models")
files = {f"tiny-llama-{q}.gguf": p for q, p in suite.quants.items()}
files.update({f"split/{p.name}": p for p in suite.split})
files["mmproj-tiny-F16.gguf"] = suite.mmproj
with HubEmulator() as hub:
    hub.add_repo("tiny/tiny-llama-GGUF", files)
    hub.add_repo("tiny/gated-GGUF", {"tiny-llama-Q2_K.gguf": suite.quants["Q2_K"]}, gated=True)
    print(f"export HF_ENDPOINT={hub.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
