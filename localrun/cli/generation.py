"""`run` and `chat`: the same options; they differ in what happens without a prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from localrun.boundary import boundary
from localrun.cli.app import app
from localrun.cli.options import (
    CacheTypeKOpt,
    CacheTypeVOpt,
    ChatFormatOpt,
    CtxOpt,
    DraftOpt,
    FlashAttnOpt,
    GpuLayersOpt,
    JsonOpt,
    ModelArg,
    PromptCacheOpt,
    PromptCacheSizeOpt,
    ReasoningBudgetOpt,
    RpcOpt,
    SpeculateOpt,
    TemplateOpt,
    ThreadsOpt,
    VerboseOpt,
    check_speculation,
    shape_options,
    size_option,
    workers_option,
)
from localrun.errors import ExitCode
from localrun.inference.generation.settings import TOP_LOGPROBS_MAX
from localrun.output import Output


def _bounded(name: str) -> dict:
    """min/max of a sampling option from the one table /set also checks against."""
    from localrun.inference.generation.settings import BOUNDS

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
TopPOpt = Annotated[
    float,
    typer.Option(
        "--top-p",
        metavar="P",
        help="Sample from the likeliest tokens up to this total probability; 1.0 disables.",
        **_bounded("top_p"),
    ),
]
TopKOpt = Annotated[
    int,
    typer.Option("--top-k", metavar="K", help="Sample from the K likeliest tokens; 0 disables.", **_bounded("top_k")),
]
MinPOpt = Annotated[
    float,
    typer.Option(
        "--min-p",
        metavar="P",
        help="Drop tokens less likely than this fraction of the likeliest; 0 disables.",
        **_bounded("min_p"),
    ),
]
RepeatPenaltyOpt = Annotated[
    float,
    typer.Option(
        "--repeat-penalty",
        metavar="X",
        help="Make recently seen tokens less likely; 1.0 disables.",
        **_bounded("repeat_penalty"),
    ),
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
RawOpt = Annotated[bool, typer.Option("--raw", help="Plain completion of the prompt, without a chat template.")]
StreamOpt = Annotated[bool, typer.Option("--stream", help="With --json: JSON Lines events as they come.")]
IgnoreEosOpt = Annotated[
    bool, typer.Option("--ignore-eos", help="Never end at an end-of-text token (fixed-length runs).")
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
ServerOpt = Annotated[
    Optional[str],
    typer.Option(
        "--server",
        metavar="URL",
        envvar="LOCALRUN_SERVER",
        show_default=False,
        help="Ask a running `localrun serve` (http://127.0.0.1:8080) instead of loading the model here.",
    ),
]
LogprobsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--logprobs",
        metavar="N",
        show_default=False,
        help="With --json: each token's log-probability and its N likeliest alternatives.",
        min=0,
        max=TOP_LOGPROBS_MAX,
    ),
]
ThinkOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--think/--no-think",
        show_default=False,
        help="A thinking model thinks, or not (through its template's switch); default: as it does.",
    ),
]
ShowThinkingOpt = Annotated[
    bool, typer.Option("--show-thinking", help="A thinking model's reasoning on stderr (chat shows it dimmed).")
]
ToolsOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--tools",
        metavar="FILE",
        show_default=False,
        help="OpenAI-style tools (JSON) the model may call; its calls are printed as JSON, one per line.",
    ),
]
ToolChoiceOpt = Annotated[
    Optional[str],
    typer.Option(
        "--tool-choice",
        metavar="auto|none|required|NAME",
        show_default=False,
        help="With --tools: whether the model may, must not, or must call a tool (NAME: that one).",
    ),
]
PromptArg = Annotated[
    Optional[list[str]],
    typer.Argument(
        metavar="PROMPT...",
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
        server: ServerOpt = None,
        rpc: RpcOpt = None,
        json: JsonOpt = False,
        stream: StreamOpt = False,
        logprobs: LogprobsOpt = None,
        think: ThinkOpt = None,
        show_thinking: ShowThinkingOpt = False,
        reasoning_budget: ReasoningBudgetOpt = None,
        tools: ToolsOpt = None,
        tool_choice: ToolChoiceOpt = None,
        verbose: VerboseOpt = False,
    ) -> None:
        from localrun.commands.generate import PromptOptions, generate
        from localrun.inference.generation.settings import SamplingOptions, Settings
        from localrun.inference.opening import EngineConfig

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

        settings = Settings(sampling, max_tokens, list(stop or []))
        if logprobs is not None and not json:
            raise UsageError("--logprobs goes with --json", hint="add --json (and --stream for them as they come)")
        settings.logprobs = logprobs
        check_speculation(speculate, draft)
        type_k, type_v, flash = shape_options(cache_type_k, cache_type_v, flash_attn)
        cache_size = size_option("--prompt-cache-size", prompt_cache_size)
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
        prompt_options = PromptOptions(
            system,
            raw,
            chat_format,
            template,
            json_schema,
            grammar,
            think,
            show_thinking,
            reasoning_budget,
            tools,
            tool_choice,
        )
        if rpc and server:
            raise UsageError("--rpc splits a model loaded here; with --server the server loads it", hint="drop one")
        workers_option(rpc, out)
        stats = generate(
            mode, model, prompt or [], cfg, settings, out, prompt_options, stream=stream, draft=draft, server=server
        )
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
