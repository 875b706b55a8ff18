"""The persistent prompt cache through the real CLI: a second run over the same material loads its
KV state and answers exactly as a run without the cache; a damaged, truncated or mismatched entry
is ignored with a note, never loaded; the folder stays within its bound."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

from typer.testing import CliRunner

from localrun.cli import app

runner = CliRunner()
GREEDY = ["--temp", "0", "--ignore-eos", "--speculate", "off", "-n", "8", "--json"]
MATERIAL = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(20))


def run(model: Path, question: str, material: str = MATERIAL, *extra: str) -> dict:
    result = runner.invoke(app, ["run", str(model), question, *GREEDY, *extra], input=material)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    data["stderr"] = result.stderr
    return data


def kv_folder() -> Path:
    return Path(os.environ["LOCALRUN_HOME"]) / "kv"


def entries() -> list[Path]:
    return sorted(kv_folder().glob("*.kv"))


def test_a_second_question_loads_the_material_and_answers_as_without_the_cache(tiny):
    model = tiny.quants["Q8_0"]
    first = run(model, "what is it about?")
    assert first["from_disk"] == 0 and len(entries()) == 1
    second = run(model, "how many lines?")
    assert second["from_disk"] > 0.9 * second["prompt_tokens"] - 16  # all but the question
    plain = run(model, "how many lines?", MATERIAL, "--no-prompt-cache")
    assert plain["from_disk"] == 0 and second["text"] == plain["text"]
    # --no-prompt-cache neither reads nor writes
    run(model, "another question", MATERIAL + " more", "--no-prompt-cache")
    assert len(entries()) == 1


def test_another_kv_layout_or_model_never_reads_the_entry(tiny):
    run(tiny.quants["Q8_0"], "what is it about?")
    for other in (
        run(tiny.quants["Q8_0"], "what is it about?", MATERIAL, "--ctx", "1024"),
        run(tiny.quants["Q4_K_M"], "what is it about?"),
        run(tiny.quants["Q8_0"], "what is it about?", MATERIAL, "--cache-type-k", "q8_0"),
    ):
        assert other["from_disk"] == 0
    assert len(entries()) == 4


def test_a_damaged_entry_is_ignored_with_a_note_and_the_answer_is_right(tiny):
    model = tiny.quants["Q8_0"]
    expected = run(model, "how many lines?", MATERIAL, "--no-prompt-cache")["text"]
    damages = {
        "truncated": lambda data: data[: len(data) // 2],
        "a flipped byte": lambda data: data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:],
        "empty": lambda data: b"",
    }
    for damage in damages.values():
        run(model, "what is it about?")
        (kv,) = entries()
        kv.write_bytes(damage(kv.read_bytes()))
        again = run(model, "how many lines?")
        assert again["from_disk"] == 0 and again["text"] == expected
        assert "prompt cache entry was damaged" in again["stderr"]
        assert kv.exists()  # removed, then saved afresh by this run
        again = run(model, "how many lines?")
        assert again["from_disk"] > 0 and again["text"] == expected
        for path in kv_folder().iterdir():
            path.unlink()


def test_an_entry_whose_tokens_differ_is_ignored_even_with_a_valid_checksum(tiny):
    """A state file of another prompt under this prompt's key (its size and checksum recorded
    anew): llama.cpp reads its tokens back, they differ, nothing of it stays in the context."""
    model = tiny.quants["Q8_0"]
    run(model, "q", "other text entirely, " * 30)
    run(model, "q")
    (a_meta, b_meta) = sorted(kv_folder().glob("*.json"), key=lambda p: json.loads(p.read_text())["tokens"])
    a_kv, b_kv = a_meta.with_suffix(".kv"), b_meta.with_suffix(".kv")
    b_kv.write_bytes(a_kv.read_bytes())
    meta = json.loads(b_meta.read_text())
    meta.update(size=b_kv.stat().st_size, crc32=zlib.crc32(b_kv.read_bytes()))
    b_meta.write_text(json.dumps(meta))
    expected = run(model, "how many lines?", MATERIAL, "--no-prompt-cache")["text"]
    again = run(model, "how many lines?")
    assert again["from_disk"] == 0 and again["text"] == expected
    assert "did not match its prompt" in again["stderr"]


def test_the_folder_keeps_to_its_bound_least_recently_used_first(tiny):
    model = tiny.quants["Q8_0"]
    run(model, "q", "alpha " * 200)
    size = entries()[0].stat().st_size
    bound = str(int(2.5 * size))
    for word in ("alpha", "beta", "gamma"):
        run(model, "q", f"{word} " * 200, "--prompt-cache-size", bound)
    run(model, "q", "beta " * 200, "--prompt-cache-size", bound)  # beta is now the most recent
    run(model, "q", "delta " * 200, "--prompt-cache-size", bound)
    assert len(entries()) == 2 and sum(p.stat().st_size for p in entries()) <= 2.5 * size
    assert run(model, "q", "beta " * 200)["from_disk"] > 0
    assert run(model, "q", "gamma " * 200)["from_disk"] == 0  # evicted


def test_a_system_prompt_through_a_template_is_reused(tiny):
    model = tiny.quants["Q8_0"]
    system = "You are a careful assistant. " * 20
    args = ["run", str(model), "--system", system, "--chat-format", "chatml", *GREEDY]
    first = runner.invoke(app, [*args, "hello"])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, [*args, "what is the sea?"])
    assert second.exit_code == 0 and json.loads(second.stdout)["from_disk"] > 100


def test_cache_ls_and_clear(tiny):
    empty = runner.invoke(app, ["cache", "ls"])
    assert empty.exit_code == 0 and "the prompt cache is empty" in empty.stderr and empty.stdout == ""
    run(tiny.quants["Q8_0"], "q")
    run(tiny.quants["Q4_K_M"], "q")
    listed = runner.invoke(app, ["cache", "ls"])
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["MODEL", "BEGINS", "TOKENS", "SIZE", "LAST", "USED"] and len(lines) == 3
    assert "2 entries" in listed.stderr
    data = json.loads(runner.invoke(app, ["cache", "ls", "--json"]).stdout)
    assert len(data["entries"]) == 2 and data["size"] == sum(p.stat().st_size for p in entries())
    assert {e["tokens"] for e in data["entries"]} == {
        json.loads(p.read_text())["tokens"] for p in kv_folder().glob("*.json")
    }
    cleared = runner.invoke(app, ["cache", "clear", "--json"])
    assert cleared.exit_code == 0 and json.loads(cleared.stdout) == {"removed": 2, "freed": data["size"]}
    assert entries() == [] and list(kv_folder().iterdir()) == []


class Collect:
    def __init__(self):
        self.parts, self.notices = [], []

    def piece(self, text):
        self.parts.append(text)

    def progress(self, event):
        pass

    def notice(self, event):
        self.notices.append(event.text)

    def finish(self, stats):
        self.stats = stats


def test_a_chat_whose_saved_prefix_fails_to_load_answers_as_a_fresh_chat(tiny):
    """After turns in memory, a failed load (llama.cpp read the file and found other tokens) may
    have cleared the context: the engine must read everything again, not trust what it held."""
    from localrun.commands.generate import PromptOptions, open_conversation
    from localrun.inference.generation.settings import SamplingOptions, Settings
    from localrun.output import Output
    from support.engines import open_engine

    model = tiny.quants["Q8_0"]
    systems = ["You are a careful assistant. " * 12, "You answer in rhymes only. " * 12]

    def conversation(engine, system):
        settings = Settings(SamplingOptions(temperature=0, ban_eog=True), 8)
        return open_conversation(engine, Output(), settings, PromptOptions(system=system, chat_format="chatml"))

    engine = open_engine(model, n_ctx=2048, speculate="off")
    try:
        other = conversation(engine, systems[1])
        other.reply("hello", Collect())  # saves the other system prompt's state
        conv = conversation(engine, systems[0])
        conv.reply("hello", Collect())  # saves this one's
        conv.reply("and then?", Collect())  # a second turn, from the KV cache in memory
        assert len(entries()) == 2  # later turns are not saved
        # the other system prompt's entry now holds this one's state, its checksum made to match
        by_use = sorted(kv_folder().glob("*.json"), key=lambda p: json.loads(p.read_text())["used"])
        theirs, ours = (p.with_suffix(".kv") for p in by_use)
        theirs.write_bytes(ours.read_bytes())
        meta = json.loads(by_use[0].read_text())
        meta.update(size=theirs.stat().st_size, crc32=zlib.crc32(theirs.read_bytes()))
        by_use[0].write_text(json.dumps(meta))
        conv.set_system(systems[1])  # a new first question whose prefix is not in memory
        conv.clear()
        got = Collect()
        conv.reply("what is the sea?", got)
    finally:
        engine.close()
    assert any("did not match its prompt" in n for n in got.notices)
    fresh_engine = open_engine(model, n_ctx=2048, speculate="off", prompt_cache=False)
    try:
        want = Collect()
        conversation(fresh_engine, systems[1]).reply("what is the sea?", want)
    finally:
        fresh_engine.close()
    assert "".join(got.parts) == "".join(want.parts) and got.stats.from_disk == 0
