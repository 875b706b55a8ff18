"""Options spelled the same way by every command that takes them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--threads", "-t", min=1, metavar="N", show_default=False, help="CPU threads (default: one per physical core)."
    ),
]
GpuLayersOpt = Annotated[
    Optional[int],
    typer.Option(
        "--gpu-layers",
        "-ngl",
        min=0,
        metavar="N",
        show_default=False,
        help="Layers to offload to the GPU (default: as many as fit).",
    ),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show llama.cpp's own log lines.")]
ModelArg = Annotated[
    str,
    typer.Argument(
        metavar="MODEL",
        help="org/repo[:QUANT], org/repo:file.gguf, hf.co/..., or a path to a .gguf file.",
        show_default=False,
    ),
]
RevisionOpt = Annotated[
    Optional[str], typer.Option("--revision", metavar="REV", help="Branch, tag or commit of the repo.")
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation (for scripts).")]
CtxOpt = Annotated[
    Optional[int],
    typer.Option(
        "--ctx",
        "-c",
        min=16,
        metavar="N",
        show_default=False,
        help="Context size in tokens (default: 4096, capped by the model).",
    ),
]
ChatFormatOpt = Annotated[
    Optional[str],
    typer.Option(
        "--chat-format",
        metavar="NAME",
        show_default=False,
        help="Built-in chat format: chatml, gemma, llama3, plain, raw.",
    ),
]
TemplateOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--template", metavar="FILE", show_default=False, help="A Jinja chat template file, instead of the model's."
    ),
]
CacheTypeKOpt = Annotated[
    str, typer.Option("--cache-type-k", metavar="TYPE", help="KV cache type of K: f16, q8_0, q4_0.")
]
CacheTypeVOpt = Annotated[
    str,
    typer.Option("--cache-type-v", metavar="TYPE", help="KV cache type of V: f16, q8_0, q4_0 (needs flash attention)."),
]
FlashAttnOpt = Annotated[str, typer.Option("--flash-attn", metavar="auto|on|off", help="Flash attention.")]

SpeculateOpt = Annotated[
    str,
    typer.Option(
        "--speculate",
        metavar="MODE",
        help="Draft tokens and verify them in one batch: auto (when it pays), lookup, draft, off.",
    ),
]
DraftOpt = Annotated[
    Optional[str],
    typer.Option(
        "--draft",
        metavar="MODEL",
        show_default=False,
        help="A small model of the same vocabulary that drafts tokens (speculative decoding).",
    ),
]
PromptCacheOpt = Annotated[
    bool,
    typer.Option(
        "--prompt-cache/--no-prompt-cache",
        help="Keep the KV state of what comes before the question on disk, and reuse it.",
    ),
]
PromptCacheSizeOpt = Annotated[
    str, typer.Option("--prompt-cache-size", metavar="SIZE", help="Bound of the prompt cache (least recently used go).")
]


ReasoningBudgetOpt = Annotated[
    Optional[int],
    typer.Option(
        "--reasoning-budget",
        metavar="N",
        show_default=False,
        min=0,
        help="A thinking model's reasoning ends after N tokens (its closing marker is inserted); 0: at once.",
    ),
]


def check_speculation(speculate: str, draft: str | None) -> None:
    """--speculate and --draft, as run, chat and serve take them."""
    from localrun.errors import UsageError

    if speculate not in ("auto", "lookup", "draft", "off"):
        raise UsageError(f"--speculate {speculate}: use auto, lookup, draft or off")
    if speculate == "draft" and draft is None:
        raise UsageError("--speculate draft needs a draft model", hint="add --draft MODEL")
    if draft is not None and speculate not in ("auto", "draft"):
        raise UsageError(f"--draft does nothing with --speculate {speculate}", hint="use auto or draft")


def size_option(flag: str, text: str) -> int:
    """A size option ('4G', '512M', bytes) in bytes; a usage error naming the flag otherwise."""
    from localrun.errors import UsageError
    from localrun.text import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def shape_options(type_k: str, type_v: str, flash_attn: str) -> tuple[str, str, bool | None]:
    """Check the KV cache and flash attention options (words, for a short --help) and convert them."""
    from localrun.errors import UsageError
    from localrun.fit import KV_TYPES

    for name, value in (("--cache-type-k", type_k), ("--cache-type-v", type_v)):
        if value.lower() not in KV_TYPES:
            raise UsageError(f"{name} {value}: not a KV cache type", hint="use " + ", ".join(KV_TYPES))
    flash = {"auto": None, "on": True, "off": False}.get(flash_attn.lower(), "bad")
    if flash == "bad":
        raise UsageError(f"--flash-attn {flash_attn}: use auto, on or off")
    if type_v.lower() != "f16":  # llama.cpp keeps a quantized V cache only with flash attention
        if flash is False:
            raise UsageError(f"a {type_v.lower()} V cache needs flash attention", hint="drop --flash-attn off")
        flash = True
    return type_k.lower(), type_v.lower(), flash  # type: ignore[return-value]


def plan_shape(type_k: str, type_v: str, flash_attn: str):
    """The context `run` would make with these KV options, as the memory planner counts it (pull,
    show): the same shape, so that what they say fits is what runs."""
    from localrun.inference.opening import EngineConfig

    k, v, flash = shape_options(type_k, type_v, flash_attn)
    return EngineConfig(type_k=k, type_v=v, flash_attn=flash).shape


RpcOpt = Annotated[
    Optional[str],
    typer.Option(
        "--rpc",
        metavar="HOST:PORT,...",
        envvar="LOCALRUN_RPC",
        show_default=False,
        help="Split the model across these workers (`localrun worker` on each machine).",
    ),
]


def workers_option(rpc: str | None, out, *, need_build: bool = True) -> tuple:
    """--rpc: the workers asked what they lend (commands.worker.use_workers), imported only when
    named (the socket and ctypes code is not every command's start-up)."""
    if not rpc:
        return ()
    from localrun.commands.worker import use_workers

    return use_workers(rpc, out, need_build=need_build)
