"""`localrun list`: the pulled models, a table on stdout (or JSON), what is damaged on stderr."""

from __future__ import annotations

import time

from localrun.model import aliases
from localrun.output import Output
from localrun.store.resolve import aliases_of
from localrun.store.scan import CacheEntry, Listing
from localrun.text import ago, human_bytes, safe


def show_listing(out: Output, listing: Listing) -> None:
    for warning in listing.warnings:
        out.warn(f"skipped a damaged cache entry: {warning}")
    for e in listing.entries:
        if e.damaged:
            out.warn(
                f"{e.label}: a file is missing from the cache (its blob was deleted); "
                f"pull it again to repair it, or `localrun rm {e.label}`"
            )
        elif e.unverified:
            out.warn(
                f"{e.label}: not verified (a pull stopped while checking its sha256); "
                f"it is checked before it loads, or now by `localrun pull {e.label}`"
            )
    named = aliases.load()
    if out.json:
        data = listing.to_dict()
        for entry, model in zip(listing.entries, data["models"]):
            model["aliases"] = aliases_of(entry, named)
        out.data(data)
        return
    if not listing.entries:
        out.info(f"no models pulled yet (cache: {listing.cache_dir})")
        out.info("pull one with `localrun pull ORG/REPO`")
        return
    with_revision = any(e.revision != "main" for e in listing.entries)
    names = {id(e): ", ".join(aliases_of(e, named)) for e in listing.entries} if named else {}
    with_aliases = any(names.values())
    header = ["MODEL", "SIZE", "FILES", *(("REVISION",) if with_revision else ()), "PULLED", "LAST USED"]
    header += ["ALIASES"] if with_aliases else []
    now = time.time()
    rows = [
        [
            safe(e.label, None),
            human_bytes(e.size),
            _files_cell(e),
            *((e.revision,) if with_revision else ()),
            ago(e.pulled, now),
            ago(e.last_used, now),
            *((safe(names[id(e)], None) or "-",) if with_aliases else ()),
        ]
        for e in listing.entries
    ]
    out.columns(header, rows, right=("SIZE",))


def _files_cell(e: CacheEntry) -> str:
    if e.damaged:
        return "damaged: file missing"
    if e.unverified:
        return "not verified"
    if e.kind == "incomplete":
        return "split, shards missing"
    return f"{e.n_shards} shards" if e.n_shards > 1 else "1 file"
