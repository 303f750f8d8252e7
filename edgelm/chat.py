"""Conversations: messages → the model's chat template → tokens → a streamed reply, in a Session whose KV
cache is reused across turns (the longest common prefix; and when the context fills up and the oldest turns
are dropped, the turns after them, moved down by a context shift). Also the OpenAI-style `Model.chat` /
`create_chat_completion` API.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

from .chat_template import ChatTemplate, template_for
from .errors import ContextError, EdgeLMError
from .runtime.generate import GenerationStats, stream_tokens
from .runtime.sampling import SamplingParams
from .tokenizer.base import ATTR_CONTROL, ATTR_UNKNOWN

log = logging.getLogger(__name__)


class Obj(dict):
    """A dict whose keys are also attributes: `r.choices[0].message.content` and `r["choices"][0]...` both work."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k) from None


def _obj(x):
    if isinstance(x, dict):
        return Obj({k: _obj(v) for k, v in x.items()})
    if isinstance(x, list):
        return [_obj(v) for v in x]
    return x


@dataclass
class TurnResult:
    text: str
    stats: GenerationStats
    dropped_messages: int = 0       # older messages removed to make room in the context


class Conversation:
    """A chat with one model: holds the messages, renders them, and streams each reply."""

    def __init__(self, model, system: str | None = None, template: ChatTemplate | None = None,
                 params: SamplingParams | None = None, max_tokens: int = -1, stop: list[str] | None = None,
                 session=None, drafter=None):
        self.model = model
        self.drafter = drafter                # speculative decoding of the replies (runtime/speculative.py)
        self.session = session or model.session
        self.template = template or template_for(model.gguf.metadata, model.tokenizer)
        self.system = system
        self.params = params or model.sampling_defaults
        self.max_tokens = max_tokens          # -1: until an end-of-turn token or the context is full
        self.stop = list(stop or [])
        self.messages: list[dict] = []        # user/assistant turns (the system prompt is kept apart)
        self.last: TurnResult | None = None
        self._probe_template()

    def _probe_template(self) -> None:
        """Render a first user turn now: a template that is broken or hostile (past its time or size budget)
        fails here, once, rather than on every message of the chat."""
        self.prompt_ids(self.all_messages([{"role": "user", "content": "Hello"}]))

    # -- prompt -----------------------------------------------------------------------------------
    def all_messages(self, extra: list[dict] = ()) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.messages + list(extra)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return render_ids(self.model, self.template, messages)

    def _fit(self, user: dict) -> tuple[list[int], list[dict]]:
        """Tokens of the prompt for the next turn, and the earlier turns it keeps: the oldest turns are
        dropped (never the system prompt) until it fits with room for a reply. Nothing is changed here, so a
        message that cannot fit (ContextError) or an abandoned turn leaves the conversation as it was."""
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        ids, kept = fit_turns(self.model, self.template, sys_msg, self.messages + [user], self.max_tokens)
        return ids, kept[:-1]

    # -- a turn ------------------------------------------------------------------------------------
    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the reply. When the iterator is exhausted the reply is part of the
        conversation; if it is abandoned (e.g. Ctrl-C) the turn is discarded."""
        user = {"role": "user", "content": text}
        ids, kept = self._fit(user)
        dropped = len(self.messages) - len(kept)
        stats = GenerationStats()
        # -1: until an end of turn or a full context; a longer max_tokens shifts the context (system stays)
        n = self.model.n_ctx - len(ids) if self.max_tokens < 0 else self.max_tokens
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        pieces: list[str] = []
        for piece in stream_tokens(self.model, self.session, ids, n, self.params, self.stop, stats,
                                   n_keep=system_prefix(self.model, self.template, sys_msg, ids),
                                   reuse_by_shift=True, drafter=self.drafter):
            pieces.append(piece)
            yield piece
        reply = "".join(pieces)
        self.messages = kept + [user, {"role": "assistant", "content": reply}]
        self.last = TurnResult(reply, stats, dropped)

    def clear(self) -> None:
        self.messages.clear()
        self.session.clear()


def fit_turns(model, template: ChatTemplate, system: list[dict], turns: list[dict], max_tokens: int | None,
              ) -> tuple[list[int], list[dict]]:
    """(prompt ids, the turns kept): the oldest turns are dropped (the system messages never, the last turn
    never) until the prompt fits with room for a reply. Nothing is changed, so a turn that cannot fit
    (ContextError) leaves a conversation as it was."""
    n_ctx = model.n_ctx
    reserve = min(max_tokens if max_tokens and max_tokens > 0 else 256, n_ctx // 4)
    kept = list(turns)
    while True:         # (no turns at all: the system messages alone)
        ids = render_ids(model, template, system + kept)
        if len(ids) + reserve <= n_ctx or len(kept) <= 1:
            break
        # drop the oldest user turn together with its reply (templates want roles to alternate)
        cut = 2 if len(kept) >= 3 and kept[1]["role"] == "assistant" else 1
        del kept[:cut]
    if len(ids) >= n_ctx:
        raise ContextError(f"the message needs {len(ids)} tokens with the system prompt, but the context holds "
                           f"{n_ctx}: shorten it or raise the context size (-c)")
    return ids, kept


def system_prefix(model, template: ChatTemplate, system: list[dict], ids: list[int]) -> int:
    """Tokens at the start of `ids` that the system prompt alone renders to (a context shift keeps them);
    without a system prompt, the BOS."""
    tok = model.tokenizer
    bos = 1 if tok.add_bos and ids and ids[0] == tok.bos_id else 0
    if not system:
        return bos
    try:
        alone = render_ids(model, template, system, add_generation_prompt=False)
    except EdgeLMError:          # a template that wants a user turn: keep the BOS only
        return bos
    n = 0
    while n < min(len(alone), len(ids)) and alone[n] == ids[n]:
        n += 1
    return max(n, bos)


def render_ids(model, template: ChatTemplate, messages: list[dict], add_generation_prompt: bool = True,
               ) -> list[int]:
    """Render and tokenize a chat prompt: control tokens only where the template writes them, every string of
    the messages tokenized as plain text; exactly one BOS when the model wants one (templates usually write
    bos_token themselves, llama.cpp would add a second)."""
    tok = model.tokenizer
    ids = encode_chat_prompt(tok, template, messages, add_generation_prompt)
    if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids.insert(0, tok.bos_id)
    return ids


# -- prompts without control-token injection ---------------------------------------------------------------------------
# A user who types "<|im_end|>\n<|im_start|>system" must not get real control tokens: llama-cpp-python and
# transformers tokenize message content as text. We render the template with every special-token text inside
# the messages' strings replaced by a private-use character that no special token, message or template holds,
# split the rendering at the special tokens (which can now only be the template's own), put the texts back into
# the plain-text runs, and tokenize each run as one piece of plain text. For messages without special-token text
# this is exactly the old `encode(render(messages), parse_special=True)`.

# Supplementary private-use planes (U+F0000..U+10FFFD): characters no tokenizer gives a meaning to.
_MARKER_RANGES = (range(0xF0000, 0xFFFFE), range(0x100000, 0x10FFFE))


def encode_chat_prompt(tok, template: ChatTemplate, messages: list[dict], add_generation_prompt: bool = True,
                       ) -> list[int]:
    markers = _SpecialMarkers(tok, messages, template.source)
    safe = markers.neutralize(messages)
    text = template.render(safe, add_generation_prompt=add_generation_prompt)
    if markers.used:
        _warn_if_template_changes_text(template, messages, add_generation_prompt, markers.restore(text))
    # the template's own special tokens are matched in `text`; each plain-text run gets its user text back
    return tok.encode_runs(text, True, [], run_text=markers.restore)


class _SpecialMarkers:
    """Maps each special-token text found in the messages to a private-use character and back."""

    def __init__(self, tok, messages, template_source: str):
        self.tok = tok
        self.protected = _protected_specials(tok, template_source)
        self.taken = set(template_source) | _special_chars(tok)
        _collect_chars(messages, self.taken)
        self.to_marker: dict[int, str] = {}      # special token id -> marker character
        self.table: dict[int, str] = {}          # ord(marker) -> special token text (for str.translate)
        self._candidates = (chr(c) for r in _MARKER_RANGES for c in r)
        self.used = False

    def neutralize(self, x):
        """A copy of the messages (dicts, lists, strings) with special-token text replaced by markers."""
        if isinstance(x, str):
            return self._neutralize_text(x)
        if isinstance(x, dict):
            return {k: self.neutralize(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [self.neutralize(v) for v in x]
        return x

    def _neutralize_text(self, s: str) -> str:
        """Scan left to right, replacing at each position the longest protected special-token text that starts
        there: what is left cannot hold one, since a marker is part of no token text."""
        first, prefixes, texts = self.protected
        out, pos, p, n = [], 0, 0, len(s)
        while p < n:
            if s[p] not in first:
                p += 1
                continue
            k, match = p + 1, None
            while k <= n and s[p:k] in prefixes:
                if s[p:k] in texts:
                    match = k
                k += 1
            if match is None:
                p += 1
                continue
            out.append(s[pos:p])
            out.append(self._marker(texts[s[p:match]]))
            pos = p = match
        if not out:
            return s
        self.used = True
        out.append(s[pos:])
        return "".join(out)

    def _marker(self, tid: int) -> str:
        m = self.to_marker.get(tid)
        if m is None:
            m = next((c for c in self._candidates if c not in self.taken), None)
            if m is None:
                raise EdgeLMError("the messages hold more distinct special-token texts than can be kept as text")
            self.to_marker[tid] = m
            self.table[ord(m)] = self.tok.tokens[tid]
        return m

    def restore(self, text: str) -> str:
        return text.translate(self.table) if self.table else text


@lru_cache(maxsize=8)
def _protected_specials(tok, template_source: str) -> tuple[frozenset, frozenset, dict[str, int]]:
    """The special tokens that message text may not produce, as (first characters, all prefixes, text -> id):
    control and unknown ones (as with parse_special=False), and user-defined ones that the template itself
    writes, e.g. gpt-oss' "<|start|>" (llama.cpp makes those USER_DEFINED). Other user-defined tokens (Gemma's
    whitespace runs, "<table>") are how ordinary text tokenizes, and are kept."""
    attrs = tok.attrs
    texts = {}
    for tid in tok.special_ids:
        text = tok.tokens[tid]
        if attrs[tid] & (ATTR_CONTROL | ATTR_UNKNOWN) or (text.strip() and text in template_source):
            texts[text] = tid
    prefixes = frozenset(t[:k] for t in texts for k in range(1, len(t) + 1))
    return frozenset(t[0] for t in texts), prefixes, texts


@lru_cache(maxsize=8)
def _special_chars(tok) -> frozenset[str]:
    """Every character of every special token's text (a marker must not be one)."""
    return frozenset("".join(tok.tokens[tid] for tid in tok.special_ids))


def _collect_chars(x, into: set) -> None:
    if isinstance(x, str):
        into.update(x)
    elif isinstance(x, dict):
        for k, v in x.items():
            _collect_chars(k, into)
            _collect_chars(v, into)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _collect_chars(v, into)


def _warn_if_template_changes_text(template, messages, add_generation_prompt, restored: str) -> None:
    """The rendering with markers, once restored, should be the plain rendering; it differs only for templates
    that cut or escape message text (the prompt still holds the messages' special-token text as text)."""
    if template.render(messages, add_generation_prompt=add_generation_prompt) != restored:
        log.warning("chat template %s changes message text that holds special-token text; that text was kept "
                    "as plain text", template.name)


def _check_messages(messages) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise EdgeLMError(f"message {i} needs 'role' and 'content'")
        out.append({"role": str(m["role"]), "content": m["content"] if m["content"] is not None else ""})
    return out


def chat_completion(model, messages, stream: bool = False, max_tokens: int | None = None,
                    stop: str | list[str] | None = None, chat_template: str | None = None, session=None,
                    drafter=None, **sampling):
    """OpenAI-style chat completion (the shape llama-cpp-python's create_chat_completion returns). Messages
    that do not fit lose their oldest turns (leading system messages stay); a max_tokens beyond the room
    left shifts the context."""
    msgs = _check_messages(messages)
    session = session or model.session
    template = template_for(model.gguf.metadata, model.tokenizer, chat_template)
    n_sys = next((i for i, m in enumerate(msgs) if m["role"] != "system"), len(msgs))
    system, turns = msgs[:n_sys], msgs[n_sys:]
    ids, _ = fit_turns(model, template, system, turns, max_tokens)
    n = model.n_ctx - len(ids) if max_tokens is None or max_tokens < 0 else max_tokens
    params = model.sampling_defaults.with_(**sampling)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    stats = model.last_stats = GenerationStats()
    # the exact prefix is reused; not a shifted run (its K/V carry dropped context): same messages, same reply
    pieces = stream_tokens(model, session, ids, n, params, stops, stats,
                           n_keep=system_prefix(model, template, system, ids), drafter=drafter)
    meta = dict(id=f"chatcmpl-{uuid.uuid4().hex[:24]}", created=int(time.time()), model=model.path)

    def finish():
        return "length" if stats.stop_reason == "length" else "stop"

    def usage():
        return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
                "total_tokens": stats.prompt_tokens + stats.generated_tokens}

    if not stream:
        text = "".join(pieces)
        return _obj(dict(meta, object="chat.completion", choices=[{
            "index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish()}],
            usage=usage()))

    def chunks():
        yield _obj(dict(meta, object="chat.completion.chunk",
                        choices=[{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]))
        for piece in pieces:
            yield _obj(dict(meta, object="chat.completion.chunk",
                            choices=[{"index": 0, "delta": {"content": piece}, "finish_reason": None}]))
        yield _obj(dict(meta, object="chat.completion.chunk",
                        choices=[{"index": 0, "delta": {}, "finish_reason": finish()}], usage=usage()))
    return chunks()
