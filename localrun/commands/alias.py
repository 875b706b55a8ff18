"""`localrun alias`: names of your own for models (kept by model/aliases.py), set, listed, removed."""

from __future__ import annotations

from dataclasses import dataclass, field

from localrun.model import aliases
from localrun.model.refs import parse_ref
from localrun.output import Output
from localrun.text import safe


@dataclass
class AliasResult:
    action: str  # "set", "removed" or "list"
    aliases: dict[str, str] = field(default_factory=dict)  # every alias after the action
    name: str | None = None
    target: str | None = None
    before: str | None = None  # what a name set anew stood for

    def to_dict(self) -> dict:
        return {
            "action": self.action,
            "name": self.name,
            "model": self.target,
            "before": self.before,
            "aliases": self.aliases,
        }


def set_alias(name: str, model: str) -> AliasResult:
    """Name `model` `name`. An alias given as the model stands for its reference (never for the
    other alias); a local file is kept by its absolute path."""
    aliases.check_name(name)
    ref = parse_ref(model)
    target = (
        str(ref.path.expanduser().resolve()) if ref.path is not None else aliases.lookup(model.strip()) or model.strip()
    )
    before = aliases.add(name, target)
    return AliasResult("set", aliases.load(), name, target, before)


def remove_alias(name: str) -> AliasResult:
    target = aliases.remove(name)
    return AliasResult("removed", aliases.load(), name, target)


def list_aliases() -> AliasResult:
    return AliasResult("list", aliases.load())


def show_alias(out: Output, result: AliasResult) -> None:
    if out.json:
        out.data(result.to_dict())
        return
    if result.action == "set":
        was = f" (it was {safe(result.before, None)})" if result.before and result.before != result.target else ""
        out.line(f"{result.name} -> {result.target}{was}")
        return
    if result.action == "removed":
        out.line(f"removed {result.name} (it was {result.target})")
        return
    if not result.aliases:
        out.info("no aliases yet: name a model with `localrun alias NAME MODEL`")
        return
    out.columns(["ALIAS", "MODEL"], [[safe(k, None), safe(v, None)] for k, v in result.aliases.items()])
