"""The chat feature end to end: `edgelm chat` driven in a pseudo-terminal as a person would use it, the OpenAI-style
`Model.chat` / `create_chat_completion` API, and how a Conversation fits the context.

Prompt token counts are checked against an independent computation: the messages rendered with plain jinja2 (the
GGUF's own template, or Gemma 3's official template for Gemma; see tests/golden/chat_templates.json) and tokenized,
minus what the KV cache already holds from the previous turn.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import jinja2
import jinja2.sandbox
import pexpect
import pytest

import edgelm
from edgelm.chat import Conversation
from edgelm.errors import ContextError
from edgelm.runtime.sampling import SamplingParams

from .conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((Path(__file__).parent / "golden" / "chat_templates.json").read_text(encoding="utf-8"))

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
STATS = re.compile(r"\[ prompt: (\d+) tokens, [\d.]+ t/s \| generation: (\d+) tokens, [\d.]+ t/s \]")
MARKERS = ("<|im_end|>", "<|im_start|>", "<end_of_turn>", "<start_of_turn>", "<bos>", "<eos>", "<|endoftext|>")
FRANCE = "What is the capital of France?"


# -- an independent reference for prompt token counts ---------------------------------------------------------------
def reference_ids(model, source: str, messages: list[dict], bos: str = "", eos: str = "") -> list[int]:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    text = env.from_string(source).render(messages=messages, add_generation_prompt=True, bos_token=bos,
                                          eos_token=eos)
    tok = model.tokenizer
    ids = tok.encode(text, add_special=False, parse_special=True)
    if tok.add_bos and ids[:1] != [tok.bos_id]:
        ids.insert(0, tok.bos_id)
    return ids


def smollm2_ids(model, messages: list[dict]) -> list[int]:
    return reference_ids(model, model.gguf.metadata["tokenizer.chat_template"], messages)


def gemma_ids(model, messages: list[dict]) -> list[int]:
    t = GOLDEN["templates"]["gemma3-official"]
    return reference_ids(model, t["source"], messages, t["bos_token"], t["eos_token"])


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# -- the REPL in a pseudo-terminal ----------------------------------------------------------------------------------
class Turn:
    def __init__(self, screen: str):
        self.screen = screen
        lines = screen.split("\n")
        m = [STATS.search(line) for line in lines]
        stat_rows = [i for i, x in enumerate(m) if x]
        self.stats = m[stat_rows[-1]] if stat_rows else None
        end = stat_rows[-1] if stat_rows else len(lines)
        # line 0 is the echo of what was typed; the reply runs up to the stats line
        self.reply = "\n".join(lines[1:end]).strip("\n")

    @property
    def prompt_tokens(self) -> int:
        assert self.stats, self.screen
        return int(self.stats.group(1))

    @property
    def generated_tokens(self) -> int:
        assert self.stats, self.screen
        return int(self.stats.group(2))


class Session:
    """`edgelm chat` in a pseudo-terminal; `ask` types a line and returns what the screen shows up to the next
    prompt (ANSI codes and carriage returns removed)."""

    def __init__(self, model_path: str, *args: str, cwd: Path, ctx: int = 1024, timeout: float = 120):
        env = dict(os.environ, TERM="dumb", HOME=str(cwd), PYTHONPATH=str(ROOT))
        self.p = pexpect.spawn(sys.executable, ["-m", "edgelm", "chat", "-m", model_path, "--temp", "0", "--stats",
                                                "-c", str(ctx), *args],
                               cwd=str(cwd), env=env, encoding="utf-8", timeout=timeout, dimensions=(40, 400))
        self.banner = self.wait_prompt()

    def wait_prompt(self, timeout: float = -1) -> str:
        self.p.expect_exact(">>> ", timeout=timeout)
        return ANSI.sub("", self.p.before).replace("\r\n", "\n").replace("\r", "")

    def command(self, line: str) -> str:
        self.p.sendline(line)
        return self.wait_prompt()

    def ask(self, line: str) -> Turn:
        return Turn(self.command(line))

    def exit_status(self, timeout: float) -> int:
        self.p.expect(pexpect.EOF, timeout=timeout)
        self.p.close()
        return self.p.exitstatus

    def close(self) -> None:
        if self.p.isalive():
            self.p.terminate(force=True)


@pytest.fixture
def session(tmp_path):
    opened = []

    def start(path, *args, **kw):
        s = Session(path, *args, cwd=tmp_path, **kw)
        opened.append(s)
        return s
    yield start
    for s in opened:
        s.close()


def assert_clean(text: str) -> None:
    for marker in MARKERS:
        assert marker not in text, f"{marker!r} shown on screen:\n{text}"
    assert "Traceback" not in text, text


def test_repl_smollm2_session(session, smollm2, smollm2_path, tmp_path):
    s = session(smollm2_path)
    assert "Set parameter 'num_predict' to '24'" in s.command("/set parameter num_predict 24")

    # first turn: the answer, the whole prompt evaluated
    t1 = s.ask(FRANCE)
    assert_clean(t1.screen)
    assert "Paris" in t1.reply
    assert t1.reply == smollm2.chat([{"role": "user", "content": FRANCE}], temperature=0).choices[0].message.content
    msgs1 = [{"role": "user", "content": FRANCE}]
    ids1 = smollm2_ids(smollm2, msgs1)
    assert t1.prompt_tokens == len(ids1)
    gen1 = smollm2.tokenizer.encode(t1.reply, add_special=False)
    assert len(gen1) == t1.generated_tokens

    # second turn: only the new tokens are evaluated, the rest comes from the KV cache
    q2 = "And what is the capital of Germany?"
    t2 = s.ask(q2)
    assert_clean(t2.screen)
    assert "Berlin" in t2.reply
    msgs2 = msgs1 + [{"role": "assistant", "content": t1.reply}, {"role": "user", "content": q2}]
    ids2 = smollm2_ids(smollm2, msgs2)
    cached = ids1 + gen1
    assert t2.prompt_tokens < t1.prompt_tokens
    assert t2.prompt_tokens == len(ids2) - common_prefix(ids2, cached)

    # parameters
    assert "Set parameter 'temperature' to '0.5'" in s.command("/set parameter temperature 0.5")
    shown = s.command("/show parameters")
    assert re.search(r"^\s*temperature\s+0\.5(\s+\(.*\))?\s*$", shown, re.M), shown
    assert re.search(r"^\s*num_predict\s+24(\s+\(.*\))?\s*$", shown, re.M), shown
    s.command("/set parameter temperature 0")
    assert re.search(r"^\s*temperature\s+0\.0(\s+\(.*\))?\s*$", s.command("/show parameters"), re.M)

    # /clear: the next prompt is the whole first prompt again, and the same answer comes back
    assert "Cleared session context" in s.command("/clear")
    t3 = s.ask(FRANCE)
    assert t3.prompt_tokens == len(ids1)
    assert t3.reply == t1.reply

    # a message of several lines between """
    s.p.sendline('"""')
    s.p.expect_exact("... ")
    s.p.sendline("Say hello")
    s.p.expect_exact("... ")
    t4 = s.ask('in French."""')
    assert_clean(t4.screen)
    assert t4.reply and t4.stats

    # /save writes the conversation as JSON
    assert "Saved conversation to f.json" in s.command("/save f.json")
    saved = json.loads((tmp_path / "f.json").read_text(encoding="utf-8"))
    expected = [{"role": "user", "content": FRANCE}, {"role": "assistant", "content": t1.reply},
                {"role": "user", "content": "Say hello\nin French."}, {"role": "assistant", "content": t4.reply}]
    assert saved["messages"] == expected
    assert saved["system"] is None
    assert saved["parameters"]["temperature"] == 0.0 and saved["num_predict"] == 24
    assert saved["model"] == os.path.basename(smollm2_path)

    # /clear, then /load: the messages are back, and the next prompt is built from them
    s.command("/clear")
    s.command("/set parameter num_predict 10")
    assert "Loaded 4 messages from f.json" in s.command("/load f.json")
    assert re.search(r"^\s*num_predict\s+24(\s+\(.*\))?\s*$", s.command("/show parameters"), re.M)
    t5 = s.ask("Thanks!")
    assert t5.prompt_tokens == len(smollm2_ids(smollm2, expected + [{"role": "user", "content": "Thanks!"}]))
    s.command("/save g.json")
    after_load = json.loads((tmp_path / "g.json").read_text(encoding="utf-8"))["messages"]
    assert after_load[:4] == expected and len(after_load) == 6

    # commands it does not know, and help
    assert "Unknown command '/foo'. Type /? for help" in s.command("/foo")
    assert "/set parameter NAME VALUE" in s.command("/?")

    # Ctrl-C while a long reply is being written: the reply stops, the turn is dropped, the session goes on
    s.command("/set parameter num_predict 400")
    story = "Write a very long story about a dragon who learns to fly."
    s.p.sendline(story)
    s.p.expect_exact(story + "\r\n")
    s.p.expect(r"\w")                       # the first words of the reply
    t0 = time.monotonic()
    s.p.send("\x03")
    s.p.expect_exact("reply stopped", timeout=15)
    stopped = s.wait_prompt(timeout=15)
    assert time.monotonic() - t0 < 10
    assert "Traceback" not in stopped and not STATS.search(stopped)
    s.command("/save h.json")
    assert json.loads((tmp_path / "h.json").read_text(encoding="utf-8"))["messages"] == after_load
    s.command("/set parameter num_predict 24")
    t6 = s.ask("Thank you!")
    assert_clean(t6.screen)
    assert t6.reply.strip() and t6.generated_tokens > 0
    s.command("/save i.json")
    assert json.loads((tmp_path / "i.json").read_text(encoding="utf-8"))["messages"] == after_load + [
        {"role": "user", "content": "Thank you!"}, {"role": "assistant", "content": t6.reply}]

    # a system prompt starts a new conversation and replaces the template's default one
    system = "Always answer in one short sentence."
    assert "Set system message." in s.command(f"/set system {system}")
    assert system in s.command("/show system")
    t7 = s.ask(FRANCE)
    assert_clean(t7.screen)
    msgs7 = [{"role": "system", "content": system}, {"role": "user", "content": FRANCE}]
    ids7 = smollm2_ids(smollm2, msgs7)
    cached = smollm2_ids(smollm2, after_load + [{"role": "user", "content": "Thank you!"}])
    cached += smollm2.tokenizer.encode(t6.reply, add_special=False)
    assert t7.prompt_tokens == len(ids7) - common_prefix(ids7, cached)
    assert t7.prompt_tokens > len(ids7) - 10
    s.command("/save j.json")
    saved = json.loads((tmp_path / "j.json").read_text(encoding="utf-8"))
    assert saved["system"] == system and saved["messages"][0] == {"role": "user", "content": FRANCE}

    # /bye leaves at once with status 0
    t0 = time.monotonic()
    s.p.sendline("/bye")
    assert s.exit_status(timeout=10) == 0
    assert time.monotonic() - t0 < 5


def test_repl_small_context_ctrl_c_and_eof(session, smollm2_path):
    s = session(smollm2_path, ctx=160)
    s.command("/set parameter num_predict 8")
    # turns that do not fit any more push the oldest ones out, with a notice
    notices = []
    for i in range(4):
        t = s.ask(f"Question {i}: please list some colours of the rainbow and some fruits that are red, "
                  f"yellow or green, and tell me which one you like best.")
        assert t.stats and "Traceback" not in t.screen
        notices += re.findall(r"\[ context full: dropped the (\d+) oldest messages \]", t.screen)
    assert notices and all(int(n) % 2 == 0 and int(n) > 0 for n in notices)
    # a message longer than the whole context: one clear line, and the session goes on
    out = s.command("word " * 300)
    errors = [line for line in out.split("\n") if line.startswith("error:")]
    assert len(errors) == 1, out
    assert "context holds 160" in errors[0] and "-c" in errors[0]
    assert "Traceback" not in out
    # Ctrl-C at the prompt only prints a hint
    s.p.send("\x03")
    s.p.expect_exact("Use Ctrl-D or /bye to exit.")
    s.wait_prompt()
    # Ctrl-D at the prompt leaves with status 0 within a few seconds
    t0 = time.monotonic()
    s.p.sendeof()
    assert s.exit_status(timeout=10) == 0
    assert time.monotonic() - t0 < 5


def test_repl_gemma_builtin_template(session, gemma, gemma_path):
    s = session(gemma_path)
    assert "'gemma' (built-in)" in s.command("/show info")
    s.command("/set parameter num_predict 24")
    t = s.ask(FRANCE)
    assert_clean(t.screen)
    assert t.reply.strip() and 0 < t.generated_tokens <= 24
    msgs1 = [{"role": "user", "content": FRANCE}]
    ids1 = gemma_ids(gemma, msgs1)
    assert t.prompt_tokens == len(ids1)
    # the screen shows exactly the reply the library generates for the same conversation
    conv = Conversation(gemma, params=SamplingParams(temperature=0), max_tokens=24)
    assert "".join(conv.send(FRANCE)).strip("\n") == t.reply
    t2 = s.ask("Thank you.")
    assert_clean(t2.screen)
    ids2 = gemma_ids(gemma, msgs1 + [{"role": "assistant", "content": conv.last.text},
                                     {"role": "user", "content": "Thank you."}])
    assert 0 < t2.prompt_tokens <= len(ids2) - len(ids1)     # the first turn's prompt came from the cache
    s.p.sendline("/exit")
    assert s.exit_status(timeout=10) == 0


# -- the Python API ---------------------------------------------------------------------------------------------
MSGS = [{"role": "user", "content": FRANCE}]


def test_chat_completion(smollm2):
    r = smollm2.chat(MSGS, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and isinstance(r.created, int)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    assert r["choices"][0]["message"]["content"] == choice.message.content
    assert r.usage.prompt_tokens == len(smollm2_ids(smollm2, MSGS))
    assert r.usage.completion_tokens == len(smollm2.tokenizer.encode(choice.message.content, add_special=False))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert not any(m in choice.message.content for m in MARKERS)


def test_chat_completion_stream_and_alias(smollm2):
    r = smollm2.chat(MSGS, temperature=0)
    chunks = list(smollm2.chat(MSGS, temperature=0, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta == {"role": "assistant"}
    pieces = [c.choices[0].delta.content for c in chunks[1:-1]]
    assert len(pieces) > 1 and all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert "".join(pieces) == r.choices[0].message.content
    assert chunks[-1].choices[0].delta == {} and chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage == r.usage
    r2 = smollm2.create_chat_completion(MSGS, temperature=0)
    assert r2.choices[0].message == r.choices[0].message and r2.usage == r.usage


def test_chat_completion_length_and_stop(smollm2):
    r = smollm2.chat(MSGS, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    full = smollm2.chat(MSGS, temperature=0).choices[0].message.content
    assert full.startswith(r.choices[0].message.content)
    r = smollm2.chat(MSGS, temperature=0, stop="Paris")
    assert r.choices[0].message.content == full[:full.index("Paris")]
    assert r.choices[0].finish_reason == "stop"


def test_chat_completion_too_long_for_context(smollm2):
    with pytest.raises(ContextError):
        smollm2.chat([{"role": "user", "content": "word " * 1100}])


@pytest.fixture(scope="module")
def small(smollm2_path):
    return edgelm.load(smollm2_path, n_ctx=160)


def test_conversation_drops_oldest_turns_and_keeps_system(small):
    system = "You are a terse assistant."
    conv = Conversation(small, system=system, params=SamplingParams(temperature=0), max_tokens=8)
    dropped = []
    for i in range(5):
        reply = "".join(conv.send(f"Turn {i}: here is a long list of things to remember: apples, bananas, "
                                  f"cherries, dates, elderberries, figs, grapes and honeydew. Summarize it."))
        assert reply == conv.last.text
        dropped.append(conv.last.dropped_messages)
        msgs = conv.all_messages()
        assert msgs[0] == {"role": "system", "content": system}
        assert msgs[1]["role"] == "user"
        assert msgs[-2]["content"].startswith(f"Turn {i}:") and msgs[-1] == {"role": "assistant", "content": reply}
        s = conv.last.stats
        assert s.prompt_tokens == len(smollm2_ids(small, msgs[:-1]))
        assert s.prompt_tokens + 8 <= small.n_ctx
    assert dropped[0] == 0 and any(d > 0 for d in dropped)
    assert all(d % 2 == 0 for d in dropped)
    # the messages kept are the newest ones, in order
    turns = [m["content"][:7] for m in conv.messages if m["role"] == "user"]
    assert turns == [f"Turn {i}:" for i in range(5 - len(turns), 5)]

    # one message longer than the whole context: ContextError, and the conversation is left as it was
    before = [dict(m) for m in conv.messages]
    with pytest.raises(ContextError, match="context holds 160"):
        list(conv.send("word " * 300))
    assert conv.messages == before
    # and it goes on
    assert "".join(conv.send("Thanks.")) == conv.last.text
    assert conv.messages[-2] == {"role": "user", "content": "Thanks."}


@pytest.mark.slow
def test_thousand_turn_chat_in_a_small_context_has_flat_memory():
    """tools/chat_soak.py: 1,000 turns at -c 512: every turn answered, RSS within 5 MiB after turn 50 (the
    issue's bar), and the turns that dropped old messages reused the cache through a shift."""
    soak = load_tool("chat_soak")
    r = soak.run("smollm2-135m", ctx=512, turns=1000, reply=16, report=lambda line: None)
    assert r["unanswered"] == 0, r
    assert r["growth_after_50_mib"] <= 5, r
    assert r["reused_by_shift"] >= 0.9 * r["turns_dropping"] > 0, r
