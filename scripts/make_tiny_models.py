"""Generate the tiny test models (quant variants, split, no template, mmproj-like, corrupt vocab).

Usage: python scripts/make_tiny_models.py [FOLDER]   (default: .cache/tests/models)
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' model builder

from support.models import build_suite  # noqa: E402

root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / ".cache" / "tests" / "models"
suite = build_suite(root)
for quant, path in suite.quants.items():
    print(f"{quant:8} {path.stat().st_size:>10,}  {path}")
for label, path in [
    ("split", suite.split[0]),
    ("no-tmpl", suite.no_template),
    ("mmproj", suite.mmproj),
    ("corrupt", suite.corrupt_vocab),
]:
    print(f"{label:8} {path.stat().st_size:>10,}  {path}")
