"""Generate the tiny test models (quant variants, split, no template, mmproj-like, corrupt vocab,
GGUFs naming last and rank pooling for embeddings)
into FOLDER (default .cache/tests/models, where the tests look for them), and list them."""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' model builder

from support.models import build_suite  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("folder", nargs="?", type=Path, default=ROOT / ".cache" / "tests" / "models")
suite = build_suite(parser.parse_args().folder)
for quant, path in suite.quants.items():
    print(f"{quant:8} {path.stat().st_size:>10,}  {path}")
for label, path in [
    ("split", suite.split[0]),
    ("no-tmpl", suite.no_template),
    ("mmproj", suite.mmproj),
    ("corrupt", suite.corrupt_vocab),
    ("pool-last", suite.pooling_last),
    ("pool-rank", suite.pooling_rank),
]:
    print(f"{label:8} {path.stat().st_size:>10,}  {path}")
