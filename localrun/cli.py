"""The command line: parse options, call one function, hand its result to the output policy.

Keep imports here light: `localrun --help` must not import llama_cpp, huggingface_hub or numpy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from localrun import __version__
from localrun.boundary import boundary
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
) -> None:
    """Hardware report: CPU features, RAM, GPUs, the llama.cpp build, and a self-test."""
    from localrun.commands import hw as command

    out = Output.from_env(json=json)
    result = command.hardware_report(out, run_selftest=selftest)
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
    json: JsonOpt = False,
) -> None:
    """Choose the quantization that fits this machine, show why, and download it."""
    from localrun.commands.pull import pull as command
    from localrun.model.refs import parse_ref

    out = Output.from_env(json=json)
    result = command(parse_ref(model, revision), out, n_ctx=ctx, dry_run=dry_run, quant=quant)
    if json:
        out.data(result.to_dict())


@app.command("list", short_help="The models pulled, whichever tool pulled them.")
@boundary
def list_models(json: JsonOpt = False) -> None:
    """Pulled models in the Hugging Face cache (also those fetched by other tools)."""
    from localrun.cache.scan import scan
    from localrun.commands.listing import show_listing

    show_listing(Output.from_env(json=json), scan())


@app.command(short_help="What a model is and how it would run here.")
@boundary
def show(model: ModelArg, ctx: CtxOpt = None, revision: RevisionOpt = None, json: JsonOpt = False) -> None:
    """What a model is and how it would run here; for a repo not pulled, reads only its header."""
    from localrun.commands import show as command
    from localrun.inference.selftest import this_machine
    from localrun.model.refs import parse_ref

    out = Output.from_env(json=json)
    ref = parse_ref(model, revision)
    command.show(out, command.describe(ref, n_ctx=ctx, machine=this_machine(out.info)))


@app.command(short_help="Remove a pulled model, or one quant of it.")
@boundary
def rm(model: ModelArg, revision: RevisionOpt = None, yes: YesOpt = False, json: JsonOpt = False) -> None:
    """Remove a pulled model (MODEL:QUANT for one quant); asks first unless --yes."""
    from localrun.commands.rm import rm as command
    from localrun.model.refs import parse_ref

    command(parse_ref(model, revision), Output.from_env(json=json), yes=yes)


@app.command(short_help="Compare quantizations: speed and quality.")
@boundary
def bench(
    models: Annotated[
        list[str],
        typer.Argument(
            help="A repo (benches its pulled quants) or several .gguf paths.", metavar="MODEL", show_default=False
        ),
    ],
    quants: Annotated[
        Optional[str],
        typer.Option(
            "--quants",
            show_default=False,
            help="With a repo: pull and bench these quants (Q4_K_M,Q8_0), or 'fit' for all that fit.",
        ),
    ] = None,
    pp: Annotated[int, typer.Option("--pp", min=0, help="Prompt tokens for the prompt-processing test.")] = 512,
    tg: Annotated[int, typer.Option("--tg", min=0, help="Tokens for the generation test.")] = 128,
    reps: Annotated[int, typer.Option("--reps", "-r", min=1, help="Repetitions after the warm-up.")] = 5,
    ppl_ctx: Annotated[int, typer.Option("--ppl-ctx", min=16, help="Window of the perplexity / KLD pass.")] = 512,
    ppl_chunks: Annotated[
        Optional[int],
        typer.Option(
            "--ppl-chunks", min=1, show_default=False, help="Score only the first N windows of the text (default: all)."
        ),
    ] = None,
    max_kld: Annotated[
        float,
        typer.Option(
            "--max-kld", min=0.0, help="The KLD a candidate may have against the reference to be recommended."
        ),
    ] = 0.05,
    eval_text: Annotated[
        Optional[Path],
        typer.Option("--text", show_default=False, help="Evaluation text (default: the one shipped with localrun)."),
    ] = None,
    no_quality: Annotated[bool, typer.Option("--no-quality", help="Speed only: no perplexity or KLD pass.")] = False,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = None,
    csv: Annotated[bool, typer.Option("--csv", help="Print CSV on stdout.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table on stdout.")] = False,
    json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Compare quantizations on this machine: speed (pp, tg, TTFT, memory) and quality (perplexity, KLD)."""
    from localrun.bench.results import BenchOptions
    from localrun.commands.bench import bench as command

    out = Output.from_env(json=json or csv or markdown, verbose=verbose)
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
    result = command(models, opts, out, "json" if json else "csv" if csv else "markdown" if markdown else "table")
    if result.interrupted:
        out.error("interrupted: the table shows what was measured so far")
        raise typer.Exit(ExitCode.INTERRUPTED)


# -- run / chat: generation options shared by both ------------------------------------------------
def _bounded(name: str) -> dict:
    """min/max of a sampling option from the one table /set also checks against."""
    from localrun.inference.sampling import BOUNDS

    bound = BOUNDS[name]
    return {"min": bound.low, "max": bound.high}


SystemOpt = Annotated[
    Optional[str], typer.Option("--system", "-s", metavar="TEXT", show_default=False, help="System prompt.")
]
MaxTokensOpt = Annotated[
    Optional[int],
    typer.Option(
        "--max-tokens",
        "-n",
        metavar="N",
        show_default=False,
        help="Stop the reply after this many tokens (default: end of text or context).",
        **_bounded("max_tokens"),
    ),
]
TemperatureOpt = Annotated[
    float,
    typer.Option(
        "--temperature", "--temp", metavar="T", help="0 is greedy (deterministic).", **_bounded("temperature")
    ),
]
TopPOpt = Annotated[float, typer.Option("--top-p", metavar="P", **_bounded("top_p"))]
TopKOpt = Annotated[int, typer.Option("--top-k", metavar="K", help="0 disables.", **_bounded("top_k"))]
MinPOpt = Annotated[float, typer.Option("--min-p", metavar="P", **_bounded("min_p"))]
RepeatPenaltyOpt = Annotated[
    float, typer.Option("--repeat-penalty", metavar="X", help="1.0 disables.", **_bounded("repeat_penalty"))
]
SeedOpt = Annotated[
    Optional[int],
    typer.Option(
        "--seed", metavar="N", show_default=False, help="Sampling seed (default: random).", **_bounded("seed")
    ),
]
StopOpt = Annotated[
    Optional[list[str]],
    typer.Option("--stop", metavar="TEXT", show_default=False, help="Stop at this text (repeatable)."),
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
RawOpt = Annotated[bool, typer.Option("--raw", help="Plain completion of the prompt, without a chat template.")]
StreamOpt = Annotated[bool, typer.Option("--stream", help="With --json: JSON Lines events as they come.")]
IgnoreEosOpt = Annotated[
    bool, typer.Option("--ignore-eos", help="Never end at an end-of-text token (fixed-length runs).")
]
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
JsonSchemaOpt = Annotated[
    Optional[str],
    typer.Option(
        "--json-schema",
        metavar="FILE|JSON",
        show_default=False,
        help="The reply is JSON that follows this schema (through a grammar).",
    ),
]
GrammarOpt = Annotated[
    Optional[Path],
    typer.Option("--grammar", metavar="FILE", show_default=False, help="The reply follows this GBNF grammar."),
]
CacheTypeKOpt = Annotated[
    str, typer.Option("--cache-type-k", metavar="TYPE", help="KV cache type of K: f16, q8_0, q4_0.")
]
CacheTypeVOpt = Annotated[
    str,
    typer.Option("--cache-type-v", metavar="TYPE", help="KV cache type of V: f16, q8_0, q4_0 (needs flash attention)."),
]
FlashAttnOpt = Annotated[str, typer.Option("--flash-attn", metavar="auto|on|off", help="Flash attention.")]


def _shape_options(type_k: str, type_v: str, flash_attn: str) -> tuple[str, str, bool | None]:
    """Check the KV cache and flash attention options (words, for a short --help) and convert them."""
    from localrun.errors import UsageError
    from localrun.fit import KV_TYPES

    for name, value in (("--cache-type-k", type_k), ("--cache-type-v", type_v)):
        if value.lower() not in KV_TYPES:
            raise UsageError(f"{name} {value}: not a KV cache type", hint="use " + ", ".join(KV_TYPES))
    flash = {"auto": None, "on": True, "off": False}.get(flash_attn.lower(), "bad")
    if flash == "bad":
        raise UsageError(f"--flash-attn {flash_attn}: use auto, on or off")
    return type_k.lower(), type_v.lower(), flash  # type: ignore[return-value]


PromptArg = Annotated[
    Optional[list[str]],
    typer.Argument(
        metavar="PROMPT",
        show_default=False,
        help="The prompt. With piped stdin it is the instruction and stdin the material it applies to.",
    ),
]


def _generation_command(mode: str, doc: str):
    """`run` and `chat` take the same options; they differ in what happens without a prompt."""

    def command(
        model: ModelArg,
        prompt: PromptArg = None,
        system: SystemOpt = None,
        max_tokens: MaxTokensOpt = None,
        temperature: TemperatureOpt = 0.8,
        top_p: TopPOpt = 0.95,
        top_k: TopKOpt = 40,
        min_p: MinPOpt = 0.05,
        repeat_penalty: RepeatPenaltyOpt = 1.1,
        seed: SeedOpt = None,
        stop: StopOpt = None,
        chat_format: ChatFormatOpt = None,
        template: TemplateOpt = None,
        raw: RawOpt = False,
        ctx: CtxOpt = None,
        gpu_layers: GpuLayersOpt = None,
        threads: ThreadsOpt = None,
        ignore_eos: IgnoreEosOpt = False,
        json_schema: JsonSchemaOpt = None,
        grammar: GrammarOpt = None,
        speculate: SpeculateOpt = "auto",
        draft: DraftOpt = None,
        prompt_cache: PromptCacheOpt = True,
        prompt_cache_size: PromptCacheSizeOpt = "4G",
        cache_type_k: CacheTypeKOpt = "f16",
        cache_type_v: CacheTypeVOpt = "f16",
        flash_attn: FlashAttnOpt = "auto",
        json: JsonOpt = False,
        stream: StreamOpt = False,
        verbose: VerboseOpt = False,
    ) -> None:
        from localrun.commands.generate import PromptOptions, generate
        from localrun.inference.engine import EngineConfig
        from localrun.inference.sampling import SamplingOptions, Settings

        out = Output.from_env(json=json, verbose=verbose)
        sampling = SamplingOptions(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            seed=seed,
            ban_eog=ignore_eos,
        )
        from localrun.errors import UsageError
        from localrun.text import parse_size

        settings = Settings(sampling, max_tokens, list(stop or []))
        if speculate not in ("auto", "lookup", "draft", "off"):
            raise UsageError(f"--speculate {speculate}: use auto, lookup, draft or off")
        if speculate == "draft" and draft is None:
            raise UsageError("--speculate draft needs a draft model", hint="add --draft MODEL")
        type_k, type_v, flash = _shape_options(cache_type_k, cache_type_v, flash_attn)
        try:
            cache_size = parse_size(prompt_cache_size)
        except ValueError as exc:
            raise UsageError(f"--prompt-cache-size: {exc}") from None
        cfg = EngineConfig(
            n_ctx=ctx,
            n_gpu_layers=gpu_layers,
            n_threads=threads,
            verbose=verbose,
            speculate=speculate,
            prompt_cache=prompt_cache,
            prompt_cache_size=cache_size,  # type: ignore[arg-type]
            type_k=type_k,
            type_v=type_v,
            flash_attn=flash,
        )
        prompt_options = PromptOptions(system, raw, chat_format, template, json_schema, grammar)
        stats = generate(mode, model, prompt or [], cfg, settings, out, prompt_options, stream=stream, draft=draft)
        if stats is not None and stats.finish_reason == "cancelled":
            raise typer.Exit(ExitCode.INTERRUPTED)

    command.__doc__ = doc
    command.__name__ = mode
    return boundary(command)


app.command("run", short_help="Answer one prompt and exit (piped stdin is the material).")(
    _generation_command("run", "Answer one prompt (argument and/or piped stdin) and exit; live speed on a terminal.")
)
app.command("chat", short_help="Chat in the terminal: history, slash commands, live speed.")(
    _generation_command(
        "chat",
        "Chat with a model: streaming replies with live speed, history, slash commands (/help). A prompt "
        "given as an argument starts the chat.",
    )
)


# -- serve / ps -----------------------------------------------------------------------------------
@app.command(short_help="Serve models over HTTP: OpenAI's API, parallel slots, continuous batching.")
@boundary
def serve(
    models: Annotated[
        Optional[list[str]],
        typer.Argument(
            metavar="[MODEL...]",
            show_default=False,
            help="Models to load now (pulled first if needed); none: every pulled model, loaded when asked for.",
        ),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", metavar="ADDR", help="Address to listen on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port (0: any free one).")] = 8080,
    parallel: Annotated[
        int, typer.Option("--parallel", "-np", min=1, max=64, metavar="N", help="Requests answered at once, per model.")
    ] = 4,
    ctx: CtxOpt = None,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            "--api-key",
            metavar="KEY",
            envvar="LOCALRUN_API_KEY",
            show_default=False,
            help="Require this key (Authorization: Bearer KEY); also from $LOCALRUN_API_KEY, unseen by ps.",
        ),
    ] = None,
    keep_alive: Annotated[
        str,
        typer.Option(
            "--keep-alive", metavar="DURATION", help="Unload a model idle this long (30s, 5m, 1h; forever: never)."
        ),
    ] = "5m",
    queue: Annotated[
        int, typer.Option("--queue", min=0, metavar="N", help="Requests per model waiting for a slot; beyond: 503.")
    ] = 16,
    max_body: Annotated[
        str, typer.Option("--max-body", metavar="SIZE", help="Largest request body (413 beyond).")
    ] = "16M",
    chat_format: ChatFormatOpt = None,
    template: TemplateOpt = None,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve models with OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models) until Ctrl-C:
    each model has --parallel slots sharing one context, their tokens decoded in the same batch."""
    from localrun.commands.serve import ServeSettings, byte_size, run_server
    from localrun.commands.serve import keep_alive as parse_keep_alive
    from localrun.inference.engine import EngineConfig
    from localrun.serve.host import ServeOptions

    out = Output.from_env(verbose=verbose)
    opts = ServeOptions(
        parallel=parallel,
        ctx=ctx,
        queue=queue,
        keep_alive=parse_keep_alive(keep_alive),
        chat_format=chat_format,
        template_file=template,
        verbose=verbose,
    )
    settings = ServeSettings(host, port, api_key or None, byte_size(max_body))
    cfg = EngineConfig(n_ctx=ctx, n_gpu_layers=gpu_layers, n_threads=threads, verbose=verbose)
    raise typer.Exit(run_server(list(models or []), opts, settings, cfg, out))


@app.command(short_help="The localrun servers running here: models, slots busy, memory.")
@boundary
def ps(json: JsonOpt = False) -> None:
    """The `localrun serve` processes running on this machine: URL, models, slots busy, memory, uptime."""
    from localrun.commands import ps as command

    out = Output.from_env(json=json)
    command.show(out, command.servers())


def main() -> None:
    app()
