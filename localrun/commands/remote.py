"""`run` and `chat` with --server: the conversation answered by a `localrun serve` process, so
nothing is loaded here. The server renders its chat template and keeps its own KV
cache per slot (a conversation too long for it loses its oldest turns, as a local chat does);
what only a local engine does (speculation, the prompt cache, KV types) is its business, so
options about them are refused rather than silently ignored."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from urllib.parse import quote

from localrun.errors import NoSpace, UsageError
from localrun.inference.conversation import Conversation
from localrun.inference.generation.events import Event, Trimmed
from localrun.inference.generation.settings import Settings
from localrun.inference.opening import EngineConfig
from localrun.serve import client
from localrun.text import safe


class RemoteConversation(Conversation):
    def __init__(
        self,
        server: client.Server,
        model: str,
        settings: Settings,
        system: str | None = None,
        *,
        raw: bool = False,
        warn: Callable[[str], None] = lambda message: None,
    ):
        super().__init__(settings, system, warn)
        self.server, self.raw = server, raw
        card = server.get(f"/v1/models/{quote(model, safe='')}")  # NotFound names what is served
        self.label = str(card.get("id") or model)
        health = server.get("/health")
        slots = next((m for m in health.get("models", ()) if m.get("id") == self.label), {})
        self.slots, self.ctx_per_slot = slots.get("slots"), slots.get("ctx_per_slot")

    @property
    def n_ctx(self) -> int | None:
        return self.ctx_per_slot

    def answer(self, material: str) -> Iterator[Event]:
        """The server's stream. A conversation its context cannot hold loses its oldest turns
        (as a local chat's does): the server says so before it reads anything, so ask again."""
        dropped = 0
        while True:
            events = self._ask()
            try:
                first = next(events)
            except NoSpace:
                gone = self.drop_oldest_turn()
                if not gone:
                    raise
                dropped += gone
                continue
            if dropped:
                self.say_dropped(dropped, self.ctx_per_slot)
            return self._following(itertools.chain([first], events))

    def _following(self, events: Iterator[Event]) -> Iterator[Event]:
        """The stream; what the server left out of a long conversation is dropped here too, and said."""
        for event in events:
            if isinstance(event, Trimmed):
                gone = 0
                while gone < event.messages and (dropped := self.drop_oldest_turn()):
                    gone += dropped
                if gone:
                    self.say_dropped(gone, self.ctx_per_slot)
            yield event

    def _ask(self) -> Iterator[Event]:
        settings = self.settings
        common = {
            "sampling": settings.sampling,
            "max_tokens": settings.max_tokens,
            "stop": list(settings.stop),
            "grammar": settings.grammar,
        }
        if self.raw:  # no template: the messages' text as one prompt, as a local --raw run reads it
            prompt = "".join(m["content"] for m in self.messages)
            return client.generate(self.server, self.label, prompt=prompt, **common)
        return client.generate(self.server, self.label, messages=list(self.messages), **common)

    def prompt_size(self) -> int:
        return self.last_stats.prompt_tokens if self.last_stats else 0

    def usage(self) -> str:
        n = len(self.messages)
        last = f"; the last prompt was {self.last_stats.prompt_tokens} tokens" if self.last_stats else ""
        return f"context: {self.ctx_per_slot or '?'} tokens a slot on the server, {n} message{'s' * (n != 1)}{last}"

    def ready(self) -> str:
        return f"{safe(self.label)} at {self.server.url} ready, context {self.ctx_per_slot or '?'} tokens"

    def about(self) -> list[str]:
        return [
            f"{safe(self.label)}, served by {self.server.url}",
            f"{self.slots or '?'} slots of {self.ctx_per_slot or '?'} tokens of context each",
            "chat template: " + ("none (--raw)" if self.raw else "the server's"),
        ]

    def facts(self) -> dict[str, object]:
        return {"model": self.label, "server": self.server.url}


# the options of EngineConfig that only shape a model loaded here, by the flag that sets them
_LOCAL_FLAGS = (
    ("--ctx", "n_ctx"),
    ("--gpu-layers", "n_gpu_layers"),
    ("--threads", "n_threads"),
    ("--speculate", "speculate"),
    ("--no-prompt-cache", "prompt_cache"),
    ("--cache-type-k", "type_k"),
    ("--cache-type-v", "type_v"),
    ("--flash-attn", "flash_attn"),
)


def refuse_local_options(cfg: EngineConfig, draft: str | None, chat_format: str | None, template: object) -> None:
    """Options that only shape a model loaded here: with --server they would do nothing."""
    default = EngineConfig()
    given = [
        *((flag, getattr(cfg, field) != getattr(default, field)) for flag, field in _LOCAL_FLAGS),
        ("--draft", draft is not None),
        ("--chat-format", chat_format is not None),
        ("--template", template is not None),
    ]
    named = [name for name, set_ in given if set_]
    if named:
        raise UsageError(
            f"{', '.join(named)} shape{'s' * (len(named) == 1)} a model loaded here; with --server the server's settings apply",
            hint="give them to `localrun serve`, or drop --server (and LOCALRUN_SERVER) to load the model here",
        )
