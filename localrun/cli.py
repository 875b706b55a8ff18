"""The command line: parse options, call one function, hand its result to the output policy.

Keep imports here light: `localrun --help` must not import llama_cpp, huggingface_hub or numpy.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from localrun import __version__
from localrun.boundary import boundary
from localrun.output import Output

app = typer.Typer(
    name="localrun",
    help="Run quantized LLMs locally: pull the GGUF that fits this machine, chat, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)

# Shared options, spelled the same way by every command.
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show llama.cpp's own log lines.")]
ModelArg = Annotated[str, typer.Argument(help="org/repo[:QUANT], org/repo:file.gguf, hf.co/..., or a path to a .gguf file.",
                                         show_default=False)]
RevisionOpt = Annotated[Optional[str], typer.Option("--revision", help="Branch, tag or commit of the repo.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation (for scripts).")]
CtxOpt = Annotated[Optional[int], typer.Option("--ctx", "-c", min=16, show_default=False,
                                               help="Context size in tokens (default: 4096, capped by the model).")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"localrun {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Show the version and exit.")] = None,
) -> None:
    """Run quantized LLMs locally: pull the GGUF that fits this machine, chat, benchmark."""


@app.command()
@boundary
def hw(
    json: JsonOpt = False,
    selftest: Annotated[bool, typer.Option("--selftest/--no-selftest",
                                           help="Load a tiny model and decode in a child process.")] = True,
) -> None:
    """Hardware report: CPU features, RAM, GPUs, the llama.cpp build, and a self-test."""
    from localrun import report

    out = Output.from_env(json=json)
    result = report.hardware_report(out, selftest=selftest)
    report.show_hardware(out, result)
    if selftest and not result.selftest_ok:
        raise typer.Exit(8)


@app.command()
@boundary
def pull(
    model: ModelArg,
    quant: Annotated[Optional[str], typer.Option("--quant", "-q", show_default=False,
                                                 help="Download this quantization (e.g. Q4_K_M) instead of the choice.")] = None,
    ctx: CtxOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the candidates and the choice; download nothing.")] = False,
    revision: RevisionOpt = None,
    json: JsonOpt = False,
) -> None:
    """Choose the quantization that fits this machine, show why, and download it."""
    from localrun import pull as pulling
    from localrun.refs import parse_ref

    out = Output.from_env(json=json)
    result = pulling.pull(parse_ref(model, revision), out, n_ctx=ctx, dry_run=dry_run, quant=quant)
    if json:
        out.data(result.to_dict())


@app.command("list")
@boundary
def list_models(json: JsonOpt = False) -> None:
    """Pulled models in the Hugging Face cache (also those fetched by other tools)."""
    from localrun import store

    store.show_listing(Output.from_env(json=json), store.scan())


@app.command()
@boundary
def rm(model: ModelArg, revision: RevisionOpt = None, yes: YesOpt = False, json: JsonOpt = False) -> None:
    """Remove a pulled model (MODEL:QUANT for one quant); asks first unless --yes."""
    from localrun import store
    from localrun.refs import parse_ref

    store.rm(parse_ref(model, revision), Output.from_env(json=json), yes=yes)


def main() -> None:
    app()
