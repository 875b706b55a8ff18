"""The application and the commands about models: hw, pull, list, show, rm, bench."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from localrun import __version__
from localrun.boundary import boundary
from localrun.cli.options import (
    CacheTypeKOpt,
    CacheTypeVOpt,
    CtxOpt,
    FlashAttnOpt,
    GpuLayersOpt,
    JsonOpt,
    ModelArg,
    RevisionOpt,
    RpcOpt,
    ThreadsOpt,
    VerboseOpt,
    YesOpt,
    plan_shape,
    workers_option,
)
from localrun.errors import ExitCode
from localrun.output import Output

app = typer.Typer(
    name="localrun",
    help="Run quantized LLMs locally: pull the GGUF that fits this machine, chat, benchmark.",
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)

# Shared options, spelled the same way by every command.


def _version(value: bool) -> None:
    if value:
        typer.echo(f"localrun {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = None,
) -> None:
    """Run quantized LLMs locally: pull the GGUF that fits this machine, chat, benchmark."""
    if ctx.invoked_subcommand is None:  # bare `localrun`: the help, and success
        typer.echo(ctx.get_help())
        raise typer.Exit()


@app.command(short_help="This machine and the llama.cpp build, with a self-test.")
@boundary
def hw(
    json: JsonOpt = False,
    selftest: Annotated[
        bool, typer.Option("--selftest/--no-selftest", help="Load a tiny model and decode in a child process.")
    ] = True,
    rpc: RpcOpt = None,
) -> None:
    """Hardware report: CPU features, RAM, GPUs, the llama.cpp build, and a self-test."""
    from localrun.commands import hw as command

    out = Output.from_env(json=json)
    found = workers_option(rpc, out, need_build=False)
    result = command.hardware_report(out, run_selftest=selftest, workers=found)
    command.show_hardware(out, result)
    if selftest and not result.selftest_ok:
        raise typer.Exit(ExitCode.CRASH)


@app.command(short_help="Download the quantization that fits this machine.")
@boundary
def pull(
    model: ModelArg,
    quant: Annotated[
        Optional[str],
        typer.Option(
            "--quant",
            "-q",
            metavar="QUANT",
            show_default=False,
            help="Download this quantization (e.g. Q4_K_M) instead of the choice.",
        ),
    ] = None,
    ctx: CtxOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the candidates and the choice; download nothing.")
    ] = False,
    revision: RevisionOpt = None,
    cache_type_k: CacheTypeKOpt = "f16",
    cache_type_v: CacheTypeVOpt = "f16",
    flash_attn: FlashAttnOpt = "auto",
    rpc: RpcOpt = None,
    json: JsonOpt = False,
) -> None:
    """Choose the quantization that fits this machine, show why, and download it."""
    from localrun.commands.pull import pull as command
    from localrun.model.refs import parse_ref

    out = Output.from_env(json=json)
    shape = plan_shape(cache_type_k, cache_type_v, flash_attn)
    workers_option(rpc, out)
    result = command(parse_ref(model, revision), out, n_ctx=ctx, dry_run=dry_run, quant=quant, shape=shape)
    if json:
        out.data(result.to_dict())


@app.command(short_help="Find GGUF models on the Hub, each with the quant that fits here.")
@boundary
def search(
    query: Annotated[
        Optional[str], typer.Argument(help="Words the repo's name contains.", metavar="[QUERY]", show_default=False)
    ] = None,
    sort: Annotated[
        str, typer.Option("--sort", metavar="ORDER", help="downloads, likes, trending or recent.")
    ] = "downloads",
    limit: Annotated[int, typer.Option("--limit", "-n", metavar="N", help="How many repos to list (1-100).")] = 20,
    author: Annotated[
        Optional[str], typer.Option("--author", metavar="ORG", show_default=False, help="Only this user's or org's.")
    ] = None,
    arch: Annotated[
        Optional[str],
        typer.Option("--arch", metavar="ARCH", show_default=False, help="Only this architecture (llama)."),
    ] = None,
    params: Annotated[
        Optional[str],
        typer.Option("--params", metavar="MIN-MAX", show_default=False, help="Parameter count: 1B-8B, 3B-, -8B."),
    ] = None,
    fits: Annotated[bool, typer.Option("--fits", help="Only the repos with a quantization that fits here.")] = False,
    ctx: CtxOpt = None,
    json: JsonOpt = False,
) -> None:
    """GGUF repos on the Hub, each with the quantization `pull` would choose on this machine (its
    size, estimated memory and largest context), or "too big" with the smallest one's need."""
    from localrun.commands import search as command

    out = Output.from_env(json=json)
    result = command.search(
        query, out, sort=sort, limit=limit, author=author, fits_only=fits, arch=arch, params=params, n_ctx=ctx
    )
    command.show_search(out, result)


@app.command("list", short_help="The models pulled, whichever tool pulled them.")
@boundary
def list_models(json: JsonOpt = False) -> None:
    """Pulled models in the Hugging Face cache (also those fetched by other tools)."""
    from localrun.commands.listing import show_listing
    from localrun.store.scan import scan

    show_listing(Output.from_env(json=json), scan())


@app.command(short_help="What a model is and how it would run here.")
@boundary
def show(
    model: ModelArg,
    ctx: CtxOpt = None,
    revision: RevisionOpt = None,
    cache_type_k: CacheTypeKOpt = "f16",
    cache_type_v: CacheTypeVOpt = "f16",
    flash_attn: FlashAttnOpt = "auto",
    rpc: RpcOpt = None,
    json: JsonOpt = False,
) -> None:
    """What a model is and how it would run here; for a repo not pulled, reads only its header."""
    from localrun.commands import show as command
    from localrun.inference.machine import this_machine
    from localrun.model.refs import parse_ref

    out = Output.from_env(json=json)
    ref = parse_ref(model, revision)
    shape = plan_shape(cache_type_k, cache_type_v, flash_attn)
    workers_option(rpc, out)
    command.show(out, command.describe(ref, n_ctx=ctx, machine=this_machine(out.info), shape=shape))


@app.command(short_help="Remove a pulled model, or one quant of it.")
@boundary
def rm(model: ModelArg, revision: RevisionOpt = None, yes: YesOpt = False, json: JsonOpt = False) -> None:
    """Remove a pulled model (MODEL:QUANT for one quant); asks first unless --yes."""
    from localrun.commands.rm import rm as command
    from localrun.model.refs import parse_ref

    command(parse_ref(model, revision), Output.from_env(json=json), yes=yes)


@app.command(short_help="Names of your own for models: set, list, remove.")
@boundary
def alias(
    name: Annotated[
        Optional[str], typer.Argument(help="The name (coder, qwen3:8b).", metavar="[NAME]", show_default=False)
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Argument(help="The model it stands for (org/repo:QUANT, a path).", metavar="[MODEL]", show_default=False),
    ] = None,
    list_: Annotated[bool, typer.Option("--list", "-l", help="List the aliases (also with no arguments).")] = False,
    remove: Annotated[
        Optional[str], typer.Option("--rm", metavar="NAME", show_default=False, help="Forget this alias.")
    ] = None,
    json: JsonOpt = False,
) -> None:
    """Name a model (`localrun alias coder org/repo:Q4_K_M`): every command, and serve's clients, take the name."""
    from localrun.commands import alias as command
    from localrun.errors import UsageError

    out = Output.from_env(json=json)
    if sum((list_, remove is not None, name is not None)) > 1 or (model is not None and name is None):
        raise UsageError("give NAME MODEL, --list or --rm NAME", hint="e.g. `localrun alias coder org/repo:Q4_K_M`")
    if name is not None and model is None:
        raise UsageError("which model should the alias name?", hint="`localrun alias NAME ORG/REPO[:QUANT]`")
    if remove is not None:
        result = command.remove_alias(remove)
    elif name is not None and model is not None:
        result = command.set_alias(name, model)
    else:
        result = command.list_aliases()
    command.show_alias(out, result)


cache_app = typer.Typer(
    help="The prompt cache: KV states of prompts' reusable prefixes (piped material, system prompts), "
    "kept on disk so that asking the same document again reads only the question.",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache", short_help="The prompt cache on disk: list it, or clear it.")


@cache_app.command("ls", short_help="List the entries: model, tokens, size, last use.")
@boundary
def cache_ls(json: JsonOpt = False) -> None:
    """The entries: the model, the tokens they hold, their size, when last used."""
    from localrun.commands import kvcache

    out = Output.from_env(json=json)
    kvcache.show(out, kvcache.report())


@cache_app.command("clear")
@boundary
def cache_clear(json: JsonOpt = False) -> None:
    """Delete every entry (they are made again as prompts are read)."""
    from localrun.commands import kvcache

    kvcache.clear(Output.from_env(json=json))


@app.command(short_help="Compare quantizations: speed and quality.")
@boundary
def bench(
    models: Annotated[
        list[str],
        typer.Argument(
            help="A repo (benches its pulled quants) or several .gguf paths.", metavar="MODEL...", show_default=False
        ),
    ],
    quants: Annotated[
        Optional[str],
        typer.Option(
            "--quants",
            metavar="QUANTS",
            show_default=False,
            help="With a repo: pull and bench these quants (Q4_K_M,Q8_0), or 'fit' for all that fit.",
        ),
    ] = None,
    pp: Annotated[
        int, typer.Option("--pp", min=0, metavar="N", help="Prompt tokens for the prompt-processing test.")
    ] = 512,
    tg: Annotated[int, typer.Option("--tg", min=0, metavar="N", help="Tokens for the generation test.")] = 128,
    reps: Annotated[int, typer.Option("--reps", "-r", min=1, metavar="N", help="Repetitions after the warm-up.")] = 5,
    ppl_ctx: Annotated[
        int, typer.Option("--ppl-ctx", min=16, metavar="N", help="Window of the perplexity / KLD pass.")
    ] = 512,
    ppl_chunks: Annotated[
        Optional[int],
        typer.Option(
            "--ppl-chunks",
            min=1,
            metavar="N",
            show_default=False,
            help="Score only the first N windows of the text (default: all).",
        ),
    ] = None,
    max_kld: Annotated[
        float,
        typer.Option(
            "--max-kld",
            min=0.0,
            metavar="KLD",
            help="The KLD a candidate may have against the reference to be recommended.",
        ),
    ] = 0.05,
    eval_text: Annotated[
        Optional[Path],
        typer.Option(
            "--text",
            metavar="FILE",
            show_default=False,
            help="Evaluation text (default: the one shipped with localrun).",
        ),
    ] = None,
    no_quality: Annotated[bool, typer.Option("--no-quality", help="Speed only: no perplexity or KLD pass.")] = False,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = None,
    csv: Annotated[bool, typer.Option("--csv", help="Print CSV on stdout.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table on stdout.")] = False,
    rpc: RpcOpt = None,
    json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Compare quantizations on this machine: speed (pp, tg, TTFT, memory) and quality (perplexity, KLD)."""
    from localrun.bench.results import BenchOptions
    from localrun.commands.bench import bench as command
    from localrun.commands.bench import output_format

    fmt = output_format(json=json, csv=csv, markdown=markdown)
    out = Output.from_env(json=fmt != "table", verbose=verbose)
    workers_option(rpc, out)
    opts = BenchOptions(
        pp=pp,
        tg=tg,
        reps=reps,
        threads=threads,
        gpu_layers=gpu_layers,
        ppl_ctx=ppl_ctx,
        ppl_chunks=ppl_chunks,
        quants=quants,
        max_kld=max_kld,
        quality=not no_quality,
        eval_text=eval_text,
        verbose=verbose,
    )
    result = command(models, opts, out, fmt)
    if result.interrupted:
        out.error("interrupted: the table shows what was measured so far")
        raise typer.Exit(ExitCode.INTERRUPTED)
