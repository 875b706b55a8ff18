"""Quantization names: bits per weight, a quality rank, and how to find them in file names.

The quality order follows published KL-divergence measurements of llama.cpp quants against the
full-precision model (llama.cpp's quantize README and PR discussions, Unsloth's dynamic-quant
tables): the higher `quality`, the closer to the original. IQ quants sit by their KLD, not their
size; imatrix ("i1-") and Unsloth dynamic ("UD-") variants rank a little above their plain twin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class QuantInfo:
    name: str
    bpw: float  # bits per weight, typical for a 7-8B llama model
    quality: float  # higher is better; ~ -log10(mean KLD) scaled, only the order matters


# name: (bits per weight, quality)
_TABLE: dict[str, tuple[float, float]] = {
    "F32": (32.0, 100.0),
    "F16": (16.0, 99.0),
    "BF16": (16.0, 99.0),
    "Q8_0": (8.5, 90.0),
    "Q6_K": (6.56, 85.0),
    "Q5_K_M": (5.69, 80.0),
    "Q5_K_S": (5.54, 78.0),
    "Q5_1": (6.0, 77.0),
    "Q5_0": (5.5, 75.0),
    "Q4_K_M": (4.85, 70.0),
    "IQ4_XS": (4.25, 68.0),
    "IQ4_NL": (4.5, 67.5),
    "Q4_K_S": (4.58, 67.0),
    "MXFP4": (4.25, 66.0),
    "Q4_1": (5.0, 65.0),
    "Q4_0": (4.5, 63.0),
    "IQ3_M": (3.66, 58.0),
    "Q3_K_L": (4.27, 57.0),
    "IQ3_S": (3.44, 55.0),
    "Q3_K_M": (3.91, 54.0),
    "IQ3_XS": (3.3, 52.0),
    "Q3_K_S": (3.5, 50.0),
    "IQ3_XXS": (3.06, 48.0),
    "Q2_K_L": (3.0, 44.0),
    "IQ2_M": (2.7, 42.0),
    "Q2_K": (2.96, 40.0),
    "Q2_K_S": (2.6, 38.0),
    "IQ2_S": (2.5, 36.0),
    "IQ2_XS": (2.31, 34.0),
    "IQ2_XXS": (2.06, 30.0),
    "TQ2_0": (2.06, 26.0),
    "IQ1_M": (1.75, 22.0),
    "TQ1_0": (1.69, 20.0),
    "IQ1_S": (1.56, 18.0),
}
# Unsloth dynamic "XL" quants: a plain K-quant with some tensors kept at higher precision.
_TABLE.update(
    {
        "Q8_K_XL": (9.0, 91.0),
        "Q6_K_XL": (7.0, 86.0),
        "Q5_K_XL": (6.0, 81.0),
        "Q4_K_XL": (5.0, 71.0),
        "Q3_K_XL": (4.2, 56.0),
        "Q2_K_XL": (3.2, 43.0),
        "IQ2_XXS_XL": (2.3, 31.0),
        "IQ1_M_XL": (1.9, 23.0),
    }
)

_VARIANT_BONUS = {"UD-": 1.5, "I1-": 1.0}

# llama.cpp's general.file_type (enum llama_ftype) -> name, for reading a header.
FTYPE_NAMES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4",
}

_NAMES_LONGEST_FIRST = sorted(_TABLE, key=len, reverse=True)
_GENERIC = re.compile(
    r"(?<![A-Za-z0-9])((?:UD-|i1-)?(?:I?Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32))(?![A-Za-z0-9])", re.IGNORECASE
)


def _token_re(tag: str) -> re.Pattern[str]:
    return re.compile(r"(?<![A-Za-z0-9])" + re.escape(tag) + r"(?![A-Za-z0-9_])", re.IGNORECASE)


def matches_tag(filename: str, tag: str) -> bool:
    """Whether `tag` appears as a whole token of the file name (as llama.cpp's `-hf repo:tag`)."""
    return bool(_token_re(tag).search(filename.rsplit("/", 1)[-1]))


def tag_names(tag: str, quant: str | None, path: str) -> bool:
    """The one rule for `repo:TAG`: the tag is the model's quant (any case), or a whole token of
    its file name or of a folder it sits in (big splits often carry the quant in the folder)."""
    return (quant or "").upper() == tag.upper() or any(matches_tag(part, tag) for part in path.split("/"))


def quant_from_filename(filename: str) -> str | None:
    """The quant name a file name carries (upper case, with UD-/i1- prefix kept), or None."""
    base = filename.rsplit("/", 1)[-1]
    for name in _NAMES_LONGEST_FIRST:
        for prefix in ("UD-", "i1-", ""):
            if _token_re(prefix + name).search(base):
                return (prefix.upper() if prefix else "") + name
    m = _GENERIC.search(base)
    return m.group(1).upper() if m else None


def info(name: str) -> QuantInfo | None:
    """Bits per weight and quality of a quant name; None when it is not in the table."""
    upper = name.upper()
    bonus = 0.0
    for prefix, extra in _VARIANT_BONUS.items():
        if upper.startswith(prefix):
            upper, bonus = upper[len(prefix) :], extra
    entry = _TABLE.get(upper)
    if entry is None:
        return None
    return QuantInfo(name.upper(), entry[0], entry[1] + bonus)


def sort_key(name: str | None, size: int) -> tuple[float, int]:
    """Best first: known quants by quality; unknown names after them, larger (more bits) first."""
    known = info(name) if name else None
    return (-(known.quality if known else -1.0), -size)
