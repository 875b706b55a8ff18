"""`serve` and `ps`: the server of OpenAI's, Anthropic's and Ollama's APIs, and the servers running here."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from localrun.boundary import boundary
from localrun.cli.app import app
from localrun.cli.options import (
    ChatFormatOpt,
    CtxOpt,
    DraftOpt,
    GpuLayersOpt,
    JsonOpt,
    PromptCacheOpt,
    PromptCacheSizeOpt,
    ReasoningBudgetOpt,
    RpcOpt,
    SpeculateOpt,
    TemplateOpt,
    ThreadsOpt,
    VerboseOpt,
    check_speculation,
    size_option,
    workers_option,
)
from localrun.output import Output


@app.command(short_help="Serve models over HTTP: OpenAI's, Anthropic's and Ollama's APIs, batched.")
@boundary
def serve(
    models: Annotated[
        Optional[list[str]],
        typer.Argument(
            metavar="MODEL...",
            show_default=False,
            help="Models to load now (pulled first if needed); none: every pulled model, loaded when asked for.",
        ),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", metavar="ADDR", help="Address to listen on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", "-p", min=0, max=65535, metavar="N", help="Port (0: any free one).")
    ] = 8080,
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
    allowed_hosts: Annotated[
        Optional[list[str]],
        typer.Option(
            "--allowed-host",
            metavar="HOST",
            show_default=False,
            help="Also answer requests sent to this host name (repeatable; *: any). Others get 421.",
        ),
    ] = None,
    cors: Annotated[
        Optional[list[str]],
        typer.Option(
            "--cors",
            metavar="ORIGIN",
            show_default=False,
            help="Allow web pages from this origin, e.g. http://localhost:3000 (repeatable; *: any). Others get 403.",
        ),
    ] = None,
    allow_model_changes: Annotated[
        bool,
        typer.Option(
            "--allow-model-changes",
            help="Let clients pull models (Ollama's /api/pull; served at once) and delete them (/api/delete). "
            "Off: those answer 403.",
        ),
    ] = False,
    # bounds on connections, for tests (hidden: ServeSettings' defaults suit every use)
    idle_timeout: Annotated[Optional[float], typer.Option("--idle-timeout", min=0.1, hidden=True)] = None,
    body_timeout: Annotated[Optional[float], typer.Option("--body-timeout", min=0.1, hidden=True)] = None,
    max_connections: Annotated[Optional[int], typer.Option("--max-connections", min=1, hidden=True)] = None,
    chat_format: ChatFormatOpt = None,
    template: TemplateOpt = None,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = None,
    speculate: SpeculateOpt = "auto",
    draft: DraftOpt = None,
    prompt_cache: PromptCacheOpt = True,
    prompt_cache_size: PromptCacheSizeOpt = "4G",
    embed_ctx: Annotated[
        int,
        typer.Option(
            "--embed-ctx",
            min=16,
            metavar="N",
            help="Tokens per input of /v1/embeddings and /v1/rerank (longer ones refused, or cut with truncate).",
        ),
    ] = 512,
    reasoning_budget: ReasoningBudgetOpt = None,
    rpc: RpcOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve models until Ctrl-C with OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models,
    /v1/embeddings, /v1/rerank), Anthropic's (/v1/messages) and Ollama's (/api/chat, /api/generate,
    /api/tags, /api/show, /api/ps; /api/pull and /api/delete with --allow-model-changes), plus
    /metrics and /tokenize: each model has --parallel slots sharing one context, their tokens decoded
    in the same batch."""
    from localrun.commands.serve import ServeSettings, run_server
    from localrun.commands.serve import keep_alive as parse_keep_alive
    from localrun.inference.opening import EngineConfig
    from localrun.serve.host import ServeOptions

    out = Output.from_env(verbose=verbose)
    check_speculation(speculate, draft)
    opts = ServeOptions(
        parallel=parallel,
        ctx=ctx,
        queue=queue,
        keep_alive=parse_keep_alive(keep_alive),
        chat_format=chat_format,
        template_file=template,
        verbose=verbose,
        speculate=speculate,  # type: ignore[arg-type]
        prompt_cache=prompt_cache,
        prompt_cache_size=size_option("--prompt-cache-size", prompt_cache_size),
        embed_ctx=embed_ctx,
        reasoning_budget=reasoning_budget,
    )
    settings = ServeSettings(
        host=host,
        port=port,
        api_key=api_key or None,
        max_body=size_option("--max-body", max_body),
        allowed_hosts=tuple(allowed_hosts or ()),
        cors=tuple(cors or ()),
        allow_model_changes=allow_model_changes,
        **{
            name: value
            for name, value in (
                ("idle_timeout", idle_timeout),
                ("body_timeout", body_timeout),
                ("max_connections", max_connections),
            )
            if value is not None
        },
    )
    cfg = EngineConfig(n_ctx=ctx, n_gpu_layers=gpu_layers, n_threads=threads, verbose=verbose)
    workers_option(rpc, out)
    raise typer.Exit(run_server(list(models or []), opts, settings, cfg, out, draft=draft))


@app.command(short_help="Lend this machine's devices to localrun on other machines (--rpc).")
@boundary
def worker(
    host: Annotated[
        str, typer.Option("--host", metavar="ADDR", help="Address to listen on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, metavar="PORT", help="Port.")] = 50052,
    threads: ThreadsOpt = None,
    cache: Annotated[
        Optional[str],
        typer.Option(
            "--cache", metavar="DIR", show_default=False, help="Keep the tensors sent here, to skip them next time."
        ),
    ] = None,
    devices: Annotated[
        Optional[str],
        typer.Option(
            "--devices", metavar="DEV,...", show_default=False, help="ggml devices to lend (default: GPUs, else CPU)."
        ),
    ] = None,
    json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Serve this machine's devices with llama.cpp's RPC server until Ctrl-C: another machine's
    `localrun run|chat|serve --rpc HOST:PORT` puts some of a model's layers here. No
    authentication, no encryption: a private network or an SSH tunnel only."""
    from localrun.commands.worker import WorkerSettings, run_worker

    out = Output.from_env(json=json, verbose=verbose)
    names = tuple(d.strip() for d in (devices or "").split(",") if d.strip())
    settings = WorkerSettings(host, port, threads, cache, names, verbose)
    raise typer.Exit(run_worker(settings, out))


@app.command(short_help="The localrun servers and workers running here: models, slots busy, memory.")
@boundary
def ps(json: JsonOpt = False) -> None:
    """The `localrun serve` and `localrun worker` processes running here: URL, models, slots busy, memory, uptime."""
    from localrun.commands import ps as command

    out = Output.from_env(json=json)
    command.show(out, command.servers())
