"""The command line: parse options, call one function, hand its result to the output policy.

Keep imports here light: `localrun --help` must not import llama_cpp, huggingface_hub or numpy.
Commands register on `app` in the order --help lists them.
"""

from localrun.cli import generation, serving  # noqa: F401  (they register run/chat, serve/ps)

# isort: split
from localrun.cli import embedding  # noqa: F401  (registers embed, listed after serve)
from localrun.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    app()
