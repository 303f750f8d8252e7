"""`edgelm chat`: an interactive conversation in the terminal, with Ollama's and llama-cli's conventions.

Ctrl-C stops the reply being written and keeps the session; Ctrl-D (end of input) leaves at once with status 0.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import asdict, fields

from ..chat import Conversation
from ..errors import EdgeLMError
from ..runtime.generate import clean_text
from ..runtime.sampling import check_value, parse_value

GREETING = "/? for help, Ctrl-D or /bye to quit"

HELP = """Commands:
  /set parameter NAME VALUE   temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, num_predict
  /set system TEXT            set the system prompt (starts a new conversation)
  /set verbose | /set quiet   show or hide timings after each reply
  /show info|template|parameters|system
  /clear                      start a new conversation
  /save FILE | /load FILE     write or read the conversation as JSON
  /bye | /exit                leave (Ctrl-D works too)
  /? | /help                  this help
Use \"\"\" to begin and end a message of several lines. Ctrl-C stops a reply."""

PARAM_ALIASES = {"temperature": "temperature", "temp": "temperature", "top_k": "top_k", "top_p": "top_p",
                 "min_p": "min_p", "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n",
                 "seed": "seed", "num_predict": "num_predict"}


class Repl:
    def __init__(self, conv: Conversation, model_name: str, stats: bool = False, out=None, inp=None,
                 sources: dict[str, str] | None = None, notes: list[str] | tuple = ()):
        """`inp`: a text stream to read lines from instead of the terminal (tests, scripts). `sources`: where
        each sampling value came from, for /show parameters (default: the model's own sources). `notes`:
        one-line remarks shown once under the greeting."""
        self.conv = conv
        self.model_name = model_name
        self.verbose = stats
        self.out = out or sys.stdout
        self.inp = inp
        self.sources = dict(sources if sources is not None else getattr(conv.model, "sampling_sources", {}))
        self.notes = list(notes)
        # grey text only on a real terminal that can show it
        self.tty = (self.out.isatty() and os.environ.get("TERM", "") != "dumb"
                    and "NO_COLOR" not in os.environ)
        self._history_file = None

    # -- output helpers ----------------------------------------------------------------------------
    def write(self, s: str) -> None:
        self.out.write(s)
        self.out.flush()

    def dim(self, s: str) -> None:
        self.write(f"\x1b[2m{s}\x1b[0m\n" if self.tty else f"{s}\n")

    # -- input --------------------------------------------------------------------------------------
    def _input(self, prompt: str) -> str:
        """One line, without its newline; EOFError at the end. Bytes that are not UTF-8 arrive as U+FFFD
        (the CLI reads stdin with errors="replace"; a stream handed in may still carry surrogates)."""
        if self.inp is None:
            line = input(prompt)
        else:
            self.write(prompt)
            line = self.inp.readline()
            if not line:
                raise EOFError
            line = line.rstrip("\n")
        return clean_text(line)

    def _setup_readline(self) -> None:
        if self.inp is not None or not sys.stdin.isatty():
            return
        try:
            import readline
        except ImportError:  # e.g. Windows without pyreadline: plain input() still works
            return
        path = os.path.join(os.path.expanduser("~"), ".cache", "edgelm", "chat_history")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if os.path.exists(path):
                readline.read_history_file(path)
            readline.set_history_length(1000)
            self._history_file = path
        except OSError:
            pass

    def _save_history(self) -> None:
        if self._history_file:
            try:
                import readline
                readline.write_history_file(self._history_file)
            except OSError:
                pass

    def read_message(self) -> str | None:
        """One message from the user; None at end of input. Ctrl-C at the prompt only prints a hint."""
        while True:
            try:
                line = self._input(">>> ")
            except UnicodeDecodeError:
                self.dim("error: that line was not valid text in the terminal's encoding; it was ignored")
                continue
            except KeyboardInterrupt:
                self.write("\nUse Ctrl-D or /bye to exit.\n")
                continue
            except EOFError:
                return None
            if line.lstrip().startswith('"""'):
                first = line.lstrip()[3:]
                if first.rstrip().endswith('"""') and first.strip():
                    return first.rstrip()[:-3]
                parts = [first] if first else []
                while True:
                    try:
                        more = self._input("... ")
                    except UnicodeDecodeError:
                        self.dim("error: that line was not valid text in the terminal's encoding; it was ignored")
                        continue
                    except EOFError:
                        return None
                    except KeyboardInterrupt:
                        self.write("\n")
                        parts = None
                        break
                    if more.rstrip().endswith('"""'):
                        parts.append(more.rstrip()[:-3])
                        break
                    parts.append(more)
                if parts is None:
                    continue
                return "\n".join(parts)
            return line

    # -- the loop -----------------------------------------------------------------------------------
    def greet(self) -> None:
        """Once, before the first prompt: how to get help and how to leave, then any notes (dim on a tty)."""
        self.dim(GREETING)
        for note in self.notes:
            self.dim(note)

    def run(self) -> int:
        self._setup_readline()
        self.greet()
        try:
            while True:
                msg = self.read_message()
                if msg is None:
                    self.write("\n")
                    return 0
                if not msg.strip():
                    continue
                if msg.startswith("/"):
                    if self.command(msg.strip()) == "exit":
                        return 0
                    continue
                self.reply(msg)
        finally:
            self._save_history()

    def reply(self, msg: str) -> None:
        conv = self.conv
        try:
            stream = conv.send(msg)
            for piece in stream:
                self.write(piece)
        except KeyboardInterrupt:
            stream.close()
            self.write("\n")
            self.dim("[ reply stopped; this turn is not kept ]")
            return
        except EdgeLMError as e:
            self.write("\n")
            self.dim(f"error: {e}")
            return
        self.write("\n")
        last = conv.last
        if last.dropped_messages:
            self.dim(f"[ context full: dropped the {last.dropped_messages} oldest messages ]")
        if last.stats.stop_reason == "context":
            self.dim("[ the context is full: the reply was cut; older turns will be dropped next ]")
        if self.verbose:
            s = last.stats
            self.dim(f"[ prompt: {s.prompt_evaluated} tokens, {s.prompt_tps:.1f} t/s | "
                     f"generation: {s.generated_tokens} tokens, {s.generate_tps:.1f} t/s ]")
            if s.draft_batches:
                self.dim(f"[ speculation: {s.draft_tokens} proposed in {s.draft_batches} batches, "
                         f"{s.draft_accepted} accepted ({100 * s.acceptance_rate:.0f} %) ]")

    # -- commands -----------------------------------------------------------------------------------
    def command(self, line: str) -> str | None:
        try:
            parts = shlex.split(line)
        except ValueError:
            parts = line.split()
        cmd, args = parts[0].lower(), parts[1:]
        if cmd in ("/bye", "/exit", "/quit"):
            return "exit"
        if cmd in ("/?", "/help"):
            self.write(HELP + "\n")
        elif cmd == "/clear":
            self.conv.clear()
            self.write("Cleared session context\n")
        elif cmd == "/set":
            self._set(line, args)
        elif cmd == "/show":
            self._show(args)
        elif cmd == "/save" and len(args) == 1:
            self._save(args[0])
        elif cmd == "/load" and len(args) == 1:
            self._load(args[0])
        else:
            self.write(f"Unknown command '{cmd}'. Type /? for help\n")
        return None

    def _set(self, line: str, args: list[str]) -> None:
        if not args:
            self.write("Usage: /set parameter NAME VALUE | /set system TEXT | /set verbose | /set quiet\n")
            return
        what = args[0].lower()
        if what == "verbose":
            self.verbose = True
            self.write("Set 'verbose' mode.\n")
        elif what == "quiet":
            self.verbose = False
            self.write("Set 'quiet' mode.\n")
        elif what == "system":
            text = line.split(None, 2)[2] if len(line.split(None, 2)) > 2 else ""
            self.conv.system = text.strip().strip('"') or None
            self.conv.messages.clear()
            self.write("Set system message.\n")
        elif what == "parameter" and len(args) == 3:
            name = PARAM_ALIASES.get(args[1].lower())
            if name is None:
                self.write(f"Unknown parameter '{args[1]}'. Known: {', '.join(sorted(set(PARAM_ALIASES.values())))}\n")
                return
            try:
                value = parse_value(name, args[2])    # the flags' and the API's rules (sampling.py)
            except EdgeLMError as e:
                self.dim(f"error: {e}")
                return
            if name == "num_predict":
                self.conv.max_tokens = value
            else:
                self.conv.params = self.conv.params.with_(**{name: value})
            self.sources[name] = "/set parameter"
            self.write(f"Set parameter '{name}' to '{args[2]}'\n")
        else:
            self.write("Usage: /set parameter NAME VALUE | /set system TEXT | /set verbose | /set quiet\n")

    def _show(self, args: list[str]) -> None:
        what = args[0].lower() if args else ""
        m, conv = self.conv.model, self.conv
        if what == "info":
            c = m.config
            self.write(f"  model          {self.model_name}\n  architecture   {c.arch}\n"
                       f"  parameters     {m.n_params / 1e6:.1f} M\n  context        {m.n_ctx} (trained {c.n_ctx_train})\n"
                       f"  KV cache       {self._cache_info()}\n"
                       f"  template       {conv.template.name}\n")
        elif what == "template":
            self.write(conv.template.source + "\n")
        elif what == "parameters":
            rows = [(f.name, getattr(conv.params, f.name)) for f in fields(conv.params)]
            rows.append(("num_predict", conv.max_tokens))
            for name, value in rows:
                source = self.sources.get(name)
                self.write(f"  {name:<16} {str(value):<10}" + (f" ({source})" if source else "") + "\n")
        elif what == "system":
            self.write((conv.system or "(no system message)") + "\n")
        else:
            self.write("Usage: /show info|template|parameters|system\n")

    def _cache_info(self) -> str:
        """The conversation's KV cache: storage types, bytes allocated (sliding layers: their rings), tokens held."""
        session = getattr(self.conv, "session", None) or self.conv.model.session
        allocated = sum(c.nbytes for c in session.caches)
        return (f"K {session.cache_type_k}, V {session.cache_type_v}: {allocated / 2**20:.1f} MiB for "
                f"{session.n_ctx} tokens, {session.n_tokens} held")

    def _save(self, path: str) -> None:
        data = {"model": self.model_name, "system": self.conv.system, "messages": self.conv.messages,
                "parameters": asdict(self.conv.params), "num_predict": self.conv.max_tokens}
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False, indent=2)
            os.replace(tmp, path)
        except OSError as e:
            self.write(f"Could not save to {path}: {e.strerror or e}\n")
            if os.path.exists(tmp):
                os.unlink(tmp)
            return
        self.write(f"Saved conversation to {path}\n")

    def _load(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            msgs = data["messages"]
            if not all(isinstance(x, dict) and x.get("role") in ("user", "assistant") and isinstance(x.get("content"), str)
                       for x in msgs):
                raise ValueError("messages must be user/assistant objects with text content")
            # parameters are checked like `/set parameter` checks them: a string or float where the sampler
            # wants a number or an integer would otherwise crash the next reply
            raw = data.get("parameters") or {}
            params = {k: v for k, v in (raw.items() if isinstance(raw, dict) else ()) if k in PARAM_ALIASES}
            params["num_predict"] = data.get("num_predict", self.conv.max_tokens)
            for k, v in params.items():
                if not (v is None and k == "seed"):
                    params[k] = check_value(PARAM_ALIASES[k], v, f"parameter {k}")
            num_predict = params.pop("num_predict")
            new_params = self.conv.params.with_(**{PARAM_ALIASES[k]: v for k, v in params.items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError, EdgeLMError) as e:
            self.write(f"Could not load {path}: {e}\n")
            return
        self.conv.messages = list(msgs)
        self.conv.system = data.get("system") or None
        self.conv.max_tokens = num_predict
        self.conv.params = new_params
        self.sources.update({PARAM_ALIASES[k]: f"loaded from {path}" for k in params if params[k] is not None})
        self.sources["num_predict"] = f"loaded from {path}"
        self.write(f"Loaded {len(msgs)} messages from {path}\n")
