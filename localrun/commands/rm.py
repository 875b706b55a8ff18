"""`localrun rm`: say what goes and what it frees, ask unless --yes, delete."""

from __future__ import annotations

from rich.text import Text

from localrun.errors import LocalrunError
from localrun.model.refs import ModelRef
from localrun.output import Output
from localrun.store.remove import RemovalPlan, plan_removal, remove
from localrun.text import human_bytes, plural, safe


def rm(ref: ModelRef, out: Output, *, yes: bool = False) -> RemovalPlan:
    """Remove what `ref` names from the cache. Declined, it raises (exit 1), so that a script
    (`yes n | localrun rm ...`) can tell that nothing was removed."""
    plan = plan_removal(ref)
    out.info("will remove:")
    for e in plan.entries:
        where = "" if e.revision == "main" else f" @ {e.revision}"
        out.info(f"  {e.label}{where}: {plural(e.n_shards, 'file')}, {human_bytes(e.size)}")
    kept = f" (keeping {plural(plan.shared, 'file')} that another revision also uses)" if plan.shared else ""
    what = "it" if len(plan.entries) == 1 else f"these {len(plan.entries)}"
    question = f"Remove {what} and free {human_bytes(plan.freed)}{kept}?"
    if not yes and not out.confirm(question, refuse_hint="add --yes to remove without asking"):
        raise LocalrunError("nothing removed: the answer was no")
    remove(plan)
    if out.json:
        out.data(plan.to_dict())
    else:
        for e in plan.entries:
            out.show(
                Text(f"removed {safe(e.label, None)}" + ("" if e.revision == "main" else f" @ {safe(e.revision)}"))
            )
    out.info(f"freed {human_bytes(plan.freed)}{kept}")
    return plan
