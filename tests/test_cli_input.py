"""The command line and the chat REPL at their edges: flags and `/set parameter` checked by one set of rules,
bytes that are not UTF-8 on the way in and out, Ctrl-C in generate, the greeting, and base models in chat."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys

import pytest

from edgelm import cli
from edgelm.chat import Conversation
from edgelm.commands.repl import GREETING, Repl

from .conftest import run_cli


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`edgelm ARGS` in this process (flag errors come before any model is loaded, so this is fast)."""
    monkeypatch.setattr(sys, "argv", ["edgelm", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.mark.parametrize("cmd", ["generate", "chat"])
@pytest.mark.parametrize("flag,value", [
    ("--temp", "nan"), ("--temp", "-1"), ("--temp", "inf"), ("--top-k", "-1"), ("--top-k", "1.5"),
    ("--top-p", "1.5"), ("--min-p", "2"), ("--min-p", "-0.1"), ("--repeat-penalty", "0"),
    ("--repeat-penalty", "nan"), ("--repeat-last-n", "-2"), ("--seed", "x"), ("-n", "-2"), ("-c", "1e11"),
    ("-c", "0"), ("-t", "0"), ("-t", "two")])
def test_bad_flags_are_one_line(monkeypatch, capsys, cmd, flag, value):
    code, out, err = run_main(monkeypatch, capsys, cmd, "-m", "no-such-model.gguf", flag, value, "x")
    lines = err.strip().splitlines()
    assert code == 1 and out == "", err
    assert len(lines) == 1 and lines[0].startswith("edgelm: error: ") and "expected" in lines[0], err
    assert flag in lines[0].split(": ")[2].split("/"), err          # names the flag, e.g. "-s/--seed"


def test_huge_context_is_a_clean_error(smollm2_path):
    p = run_cli("generate", "-m", smollm2_path, "-c", str(10**11), "Hi")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "KV cache" in lines[0] and "GiB" in lines[0], p.stderr


# -- the REPL in this process ----------------------------------------------------------------------------------
def repl_run(model, lines: list[str], **kw) -> str:
    conv = Conversation(model, params=model.sampling_defaults.with_(temperature=0), max_tokens=3)
    out = io.StringIO()
    assert Repl(conv, "m", out=out, inp=io.StringIO("".join(x + "\n" for x in lines)), **kw).run() == 0
    return out.getvalue()


def test_repl_greets_once_and_checks_parameters(smollm2):
    screen = repl_run(smollm2, ["/set parameter min_p 5", "/set parameter temp nan", "/set parameter top_k 2.5",
                                "/set parameter num_predict -7", "/set parameter top_k 7", "/show parameters"],
                      sources={**smollm2.sampling_sources, "top_p": "flag"})
    assert screen.startswith(GREETING + "\n>>> ") and screen.count(GREETING) == 1
    errors = [line for line in screen.splitlines() if "error:" in line]
    assert len(errors) == 4 and all(" expected " in e for e in errors), screen
    assert "Set parameter 'top_k' to '7'" in screen
    shown = [line.removeprefix(">>> ") for line in screen.splitlines()]    # prompts have no newline
    rows = {line.split()[0]: line for line in shown if line.startswith("  ")}
    assert rows["top_k"].split()[1:] == ["7", "(/set", "parameter)"]
    assert rows["min_p"].split()[1] == "0.05"                      # the refused value left it unchanged
    assert rows["temperature"].endswith("(catalog smollm2-135m)")
    assert rows["top_p"].endswith("(flag)")
    assert rows["repeat_penalty"].endswith("(llama.cpp default)")


def test_repl_survives_surrogates_in_a_line(smollm2):
    screen = repl_run(smollm2, ["caf\udce9 \udcff?", "/bye"])
    assert screen.count(">>> ") == 2 and "Traceback" not in screen


def test_repl_notes_are_shown_once(smollm2):
    screen = repl_run(smollm2, [], notes=["a note"])
    assert screen.splitlines()[:2] == [GREETING, "a note"]


# -- bytes that are not UTF-8, in a real process ----------------------------------------------------------------
def run_bytes(args: list, stdin: bytes = b"", env: dict | None = None) -> subprocess.CompletedProcess:
    """Streams strict by default, as in a UTF-8 desktop locale (a C or C.UTF-8 locale would make Python read
    stdin with surrogateescape and hide the problem)."""
    env = dict(os.environ, **{"PYTHONIOENCODING": "utf-8:strict", **(env or {})})
    return subprocess.run([sys.executable, "-m", "edgelm", *args], input=stdin, capture_output=True, timeout=300,
                          env=env)


def test_chat_goes_on_after_a_bad_byte(smollm2_path):
    p = run_bytes(["chat", "-m", smollm2_path, "--temp", "0", "-n", "3", "-v"],
                  b"caf\xe9 \xff\xfe?\nWhat is 2+2?\n/bye\n")
    out, err = p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")
    assert p.returncode == 0 and "Traceback" not in err, err
    assert out.count(">>> ") == 3 and out.count("[ prompt: ") == 2, out    # both messages answered, -v = --stats


def test_generate_with_bad_bytes_in_argv_and_stdin(smollm2_path):
    p = run_bytes(["generate", "-m", smollm2_path, "-n", "2", "--temp", "0", b"caf\xe9 \xff"])
    assert p.returncode == 0 and b"Traceback" not in p.stderr, p.stderr
    p = run_bytes(["generate", "-m", smollm2_path, "-n", "2", "--temp", "0", "--stats"], b"caf\xe9 \xff au lait")
    assert p.returncode == 0 and b"Traceback" not in p.stderr, p.stderr
    assert b"generation: 2 tokens" in p.stderr                   # --stats on generate too


def test_text_for_an_ascii_terminal_is_replaced_not_fatal(smollm2_path):
    args = ["generate", "-m", smollm2_path, "-n", "12", "--temp", "0", "é è ê à ç, é è ê à ç, é è ê à ç,"]
    utf8 = run_bytes(args, env={"PYTHONIOENCODING": "utf-8"})
    text = utf8.stdout.decode("utf-8")
    assert utf8.returncode == 0 and not text.isascii()          # the reference: this continuation has accents
    ascii_ = run_bytes(args, env={"PYTHONIOENCODING": "ascii:strict"})
    assert ascii_.returncode == 0 and b"Traceback" not in ascii_.stderr, ascii_.stderr
    assert ascii_.stdout.decode("ascii") == text.encode("ascii", "replace").decode("ascii")


def test_ctrl_c_in_generate_keeps_the_text_and_exits_130(smollm2_path):
    p = subprocess.Popen([sys.executable, "-m", "edgelm", "generate", "-m", smollm2_path, "-n", "-1", "--temp", "0",
                          "--repeat-penalty", "1.3", "Once upon a time"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    while len(seen) < 20:
        chunk = os.read(p.stdout.fileno(), 256)
        assert chunk, p.stderr.read()
        seen += chunk
    p.send_signal(signal.SIGINT)
    rest, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err == b"", err
    out = seen + rest
    assert out.endswith(b"\n") and len(out.strip()) >= 20


# -- a base model in chat -----------------------------------------------------------------------------------------
def test_chat_on_a_base_model_says_so_once_and_caps_replies(gemma_path):
    p = run_cli("chat", "-m", gemma_path, "-c", "256", input="/show parameters\n/bye\n", timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == GREETING
    notes = [line for line in lines if "base model without a chat template" in line]
    assert len(notes) == 1 and "-n -1" in notes[0] and "num_predict -1" in notes[0], p.stdout
    cap = [line for line in lines if line.strip().startswith("num_predict")]
    assert cap and cap[0].split()[1] == str(cli.BASE_MODEL_REPLY_CAP), p.stdout
    assert "stops after" not in cli._base_model_note("m.gguf", capped=False)   # -n given: no cap to mention
