"""`embed`: texts to vectors with a model loaded here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from localrun.boundary import boundary
from localrun.cli.app import app
from localrun.cli.options import FlashAttnOpt, GpuLayersOpt, ModelArg, ThreadsOpt, VerboseOpt, shape_options
from localrun.output import Output


@app.command(short_help="Embed each line of stdin: JSON Lines of vectors, or a .npy array.")
@boundary
def embed(
    model: ModelArg,
    format: Annotated[
        str,
        typer.Option("--format", "-f", metavar="jsonl|npy", help='JSON Lines ({"index", "embedding"}) or numpy .npy.'),
    ] = "jsonl",
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", metavar="FILE", show_default=False, help="Write the vectors here, not stdout."),
    ] = None,
    normalize: Annotated[
        bool, typer.Option("--normalize/--no-normalize", help="Scale each vector to unit length (L2).")
    ] = True,
    truncate: Annotated[
        bool, typer.Option("--truncate", help="Cut a line longer than --ctx tokens to fit (default: refuse it).")
    ] = False,
    ctx: Annotated[
        int, typer.Option("--ctx", "-c", min=16, metavar="N", help="Tokens per line at most (capped by the model).")
    ] = 512,
    gpu_layers: GpuLayersOpt = None,
    threads: ThreadsOpt = None,
    flash_attn: FlashAttnOpt = "auto",
    verbose: VerboseOpt = False,
) -> None:
    """Embed each line of stdin with MODEL, pooled as its GGUF says (mean for a generative model that
    names no pooling); many lines are batched into one decode."""
    from localrun.commands import embed as command
    from localrun.commands.generate import read_stdin
    from localrun.errors import UsageError
    from localrun.inference.opening import EngineConfig

    if format not in command.FORMATS:
        raise UsageError(f"--format {format}: use jsonl or npy")
    command.check_output(output)
    out = Output.from_env(verbose=verbose)
    cfg = EngineConfig(
        n_gpu_layers=gpu_layers,
        n_threads=threads,
        verbose=verbose,
        flash_attn=shape_options("f16", "f16", flash_attn)[2],
    )
    texts = (read_stdin(out.warn) or "").splitlines()
    result = command.embed(model, texts, cfg, out, max_tokens=ctx, normalize=normalize, truncate=truncate)
    command.show_embedded(out, result, format, output)
