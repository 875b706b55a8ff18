"""Serve the tiny models through the tests' Hub emulator on loopback, for trying `localrun pull`
by hand: in another shell, export the HF_ENDPOINT it prints. Its repos: tiny/tiny-llama-GGUF
(every quant, a split model, an mmproj) and tiny/gated-GGUF (gated: token hf_testtoken).
Ctrl-C stops it."""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' Hub emulator and model builder

from support.hub import HubEmulator  # noqa: E402
from support.models import build_suite  # noqa: E402

argparse.ArgumentParser(description=__doc__).parse_args()
suite = build_suite(ROOT / ".cache" / "tests" / "models")
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
