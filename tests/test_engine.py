"""The engine: streaming events, greedy determinism, KV reuse, stop strings, cancellation, templates."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from localrun.errors import UsageError
from localrun.inference.engine import Engine
from localrun.inference.generation.events import Piece, PrefillProgress, Stats
from localrun.inference.generation.settings import SamplingOptions
from localrun.inference.generation.stops import StopMatcher
from localrun.inference.prompting import templates
from support.engines import open_engine

GREEDY = SamplingOptions(temperature=0)


def run(
    engine: Engine, tokens: list[int], n: int = 24, stop: list[str] | None = None, sampling: SamplingOptions = GREEDY
) -> tuple[str, Stats]:
    events = [e for e in engine.generate(tokens, sampling, n, stop or []) if isinstance(e, (Piece, Stats))]
    assert isinstance(events[-1], Stats) and all(isinstance(e, Piece) for e in events[:-1])
    return "".join(e.text for e in events[:-1]), events[-1]


@pytest.fixture(scope="module")
def tiny_engine(tiny):
    engine = open_engine(tiny.quants["Q8_0"], n_ctx=512)
    yield engine
    engine.close()


def test_greedy_is_deterministic_and_stats_add_up(tiny_engine: Engine):
    tokens = tiny_engine.tokenize("the capital of France is")
    first, stats = run(tiny_engine, tokens, n=16, sampling=SamplingOptions(temperature=0, ban_eog=True))
    again, _ = run(tiny_engine, tokens, n=16, sampling=SamplingOptions(temperature=0, ban_eog=True))
    assert first == again and first
    assert stats.finish_reason == "length" and stats.generated_tokens == 16
    assert stats.prompt_tokens == len(tokens)
    assert 0 < stats.ttft_s <= stats.total_s and stats.gen_tps > 0


def test_kv_cache_is_reused_for_a_longer_prompt(tiny_engine: Engine):
    base = tiny_engine.tokenize("the old man said to the boy")
    run(tiny_engine, base, n=4)
    longer = tiny_engine.tokenize("the old man said to the boy and the dog went home")
    text_cached, stats = run(tiny_engine, longer, n=8)
    assert stats.cached_tokens >= len(base) - 1
    # the same prompt from a cold cache gives the same text: reuse changes speed, not results
    tiny_engine.cached = []
    tiny_engine.ctx.reset()
    text_cold, cold = run(tiny_engine, longer, n=8)
    assert cold.cached_tokens == 0 and text_cold == text_cached


def test_stop_string_ends_the_reply_without_leaking(tiny_engine: Engine):
    tokens = tiny_engine.tokenize("you can tell me a story about the sea")
    sampling = SamplingOptions(temperature=0, ban_eog=True)
    full, _ = run(tiny_engine, tokens, n=30, sampling=sampling)
    assert len(full) > 12
    stop = full[6:11]  # a stop string that likely spans token boundaries
    text, stats = run(tiny_engine, tokens, n=30, stop=[stop], sampling=sampling)
    assert stats.finish_reason == "stop" and stats.stop == stop
    assert text == full[: full.index(stop)]


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["<|end|>"])
    assert m.feed("hello <") == ("hello ", False)
    assert m.feed("|en") == ("", False)
    assert m.feed("d|> more") == ("", True)
    m = StopMatcher(["ab"])
    assert m.feed("xa") == ("x", False)
    assert m.feed("c") == ("ac", False)
    assert m.flush() == ""
    assert StopMatcher([]).feed("abc") == ("abc", False)


def test_the_stop_string_found_first_is_the_one_named():
    m = StopMatcher(["later", "first", "irs"])
    assert m.feed("the first, later") == ("the ", True) and m.matched == "first"


def test_consumer_interrupt_cancels_and_the_next_turn_works(tiny_engine: Engine):
    tokens = tiny_engine.tokenize("the man and the dog")
    sampling = SamplingOptions(temperature=0, ban_eog=True)
    gen = tiny_engine.generate(tokens, sampling, 50, [])
    assert isinstance(next(e for e in gen if isinstance(e, (Piece, Stats))), Piece)
    final = gen.throw(KeyboardInterrupt)
    assert isinstance(final, Stats) and final.finish_reason == "cancelled"
    after, stats = run(tiny_engine, tokens, n=10, sampling=sampling)
    tiny_engine.cached = []
    tiny_engine.ctx.reset()
    cold, _ = run(tiny_engine, tokens, n=10, sampling=sampling)
    assert stats.finish_reason == "length" and after == cold


@pytest.mark.slow
def test_ctrl_c_aborts_a_long_prompt_and_the_engine_recovers(gemma: Path):
    engine = open_engine(gemma, n_ctx=4096)
    try:
        tokens = engine.tokenize("the quick brown fox jumps over the lazy dog " * 300)
        timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))  # in the first batch of 512
        timer.start()
        _, stats = run(engine, tokens, n=5)
        timer.join()
        assert stats.finish_reason == "cancelled" and stats.generated_tokens == 0
        assert engine.cached == []  # that batch was aborted, not finished first: nothing of it is kept
        short = engine.tokenize("The capital of France is the city of")
        text, stats = run(engine, short, n=5)
        assert stats.finish_reason == "length" and text.startswith(" Paris")
    finally:
        engine.close()


def test_templates_render_in_a_sandbox_and_refuse_cleanly():
    chatml = templates.choose(None, chat_format="chatml", template_file=None, has_token=lambda t: False)
    text = chatml.render([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    refusing = templates.ChatTemplate("{{ raise_exception('only user and assistant') }}", "model")
    with pytest.raises(UsageError, match="only user and assistant"):
        refusing.render([{"role": "user", "content": "x"}])
    escaping = templates.ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", "model")
    with pytest.raises(Exception):  # the sandbox refuses attribute access to internals
        escaping.render([])
    with pytest.raises(UsageError, match="unknown chat format"):
        templates.choose(None, chat_format="nope", template_file=None, has_token=lambda t: False)


def test_missing_template_picks_a_fallback_and_says_so(tiny):
    notes: list[str] = []
    engine = open_engine(tiny.no_template, n_ctx=256)
    try:
        assert engine.chat_template() is None
        chosen = templates.choose(
            engine.chat_template(),
            chat_format=None,
            template_file=None,
            has_token=engine.has_token,
            notify=notes.append,
        )
    finally:
        engine.close()
    assert chosen.origin == "built-in chatml (fallback)"
    assert len(notes) == 1 and "--chat-format" in notes[0] and "--template FILE" in notes[0]


def test_template_file_and_bos_is_not_doubled(tiny, tmp_path: Path):
    engine = open_engine(tiny.quants["Q8_0"], n_ctx=256)
    try:
        path = tmp_path / "t.jinja"
        path.write_text("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
        t = templates.choose(
            "ignored",
            chat_format=None,
            template_file=path,
            has_token=engine.has_token,
            bos_token=engine.special_text("bos"),
        )
        text = t.render([{"role": "user", "content": "hello"}])
        assert text == "<s>[user] hello\n"
        tokens = engine.tokenize(text)
        assert tokens[0] == 1 and tokens[1] != 1
    finally:
        engine.close()


def test_allocation_failure_backs_off_gpu_layers_then_context(tiny, monkeypatch, capsys):
    """No GPU here and no safe way to exhaust RAM: llama.cpp's allocation failure is the faked
    boundary (as if VRAM held no layer and RAM only 1024 tokens of context); loading is real."""
    from localrun.errors import NoSpace
    from localrun.inference.llama import runtime

    real_load = runtime.load
    tried: list[tuple[int, int]] = []

    def load(path, opts, progress=None):
        tried.append((opts.n_gpu_layers, opts.n_ctx))
        if opts.n_gpu_layers > 0 or opts.n_ctx > 1024:
            raise NoSpace(f"llama.cpp could not create a context of {opts.n_ctx} tokens")
        return real_load(path, opts, progress)

    monkeypatch.setattr(runtime, "load", load)
    engine = open_engine(tiny.quants["Q8_0"], n_ctx=4096, n_gpu_layers=2)
    try:
        assert tried == [(2, 4096), (1, 4096), (0, 4096), (0, 2048), (0, 1024)]
        assert engine.n_ctx == 1024 and engine.info.n_gpu_layers == 0
        assert engine.info.notes == [
            "GPU layers reduced from 2 to 1 to fit",
            "GPU layers reduced from 1 to 0 to fit",
            "context reduced from 4096 to 2048 to fit",
            "context reduced from 2048 to 1024 to fit",
        ]
    finally:
        engine.close()
    err = capsys.readouterr().err
    assert "retrying with 1" in err and "could not allocate a context of 2048 tokens; retrying with 1024" in err


@pytest.mark.slow
def test_characters_split_over_byte_tokens_come_out_whole(gemma: Path):
    engine = open_engine(gemma, n_ctx=512)
    try:
        assert len(engine.model.tokenize("𓀀", add_special=False)) == 4  # four byte tokens in Gemma's vocabulary
        events = [
            e for e in engine.generate(engine.tokenize("𓀀𐍈 " * 8), GREEDY, 9, []) if isinstance(e, (Piece, Stats))
        ]
    finally:
        engine.close()
    pieces = [e.text for e in events[:-1]]
    assert pieces == ["𓀀", "𐍈", " "]  # 8 byte tokens, 2 whole characters, no replacement characters
    assert "\ufffd" not in "".join(pieces)


@pytest.mark.slow
def test_a_long_prompt_reports_progress_and_a_closed_stream_stops_it(gemma: Path):
    engine = open_engine(gemma, n_ctx=4096)
    try:
        tokens = engine.tokenize("the quick brown fox jumps over the lazy dog " * 300)
        gen = engine.generate(tokens, GREEDY, 5, [])
        first = next(gen)
        assert isinstance(first, PrefillProgress) and first.prompt_tokens == len(tokens) and first.cached_tokens == 0
        gen.close()  # the consumer walks away mid-prompt: the decode is aborted, not left running
        text, stats = run(engine, engine.tokenize("The capital of France is the city of"), n=3)
        assert text.startswith(" Paris") and stats.cached_tokens <= 1
    finally:
        engine.close()
