"""Conversations: messages → the model's chat template → tokens → a streamed reply, with the KV cache reused
across turns (Model.prefill keeps the longest common prefix) and the oldest turns dropped when the context
fills up. Also the OpenAI-style `Model.chat` / `create_chat_completion` API.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Iterator

from .chat_template import ChatTemplate, template_for
from .errors import ContextError, EdgeLMError
from .generate import GenerationStats, stream_tokens
from .sampling import SamplingParams


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
                 params: SamplingParams | None = None, max_tokens: int = -1, stop: list[str] | None = None):
        self.model = model
        self.template = template or template_for(model.gguf.metadata, model.tokenizer)
        self.system = system
        self.params = params or SamplingParams()
        self.max_tokens = max_tokens          # -1: until an end-of-turn token or the context is full
        self.stop = list(stop or [])
        self.messages: list[dict] = []        # user/assistant turns (the system prompt is kept apart)
        self.last: TurnResult | None = None

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
        n_ctx = self.model.n_ctx
        reserve = min(self.max_tokens if self.max_tokens > 0 else 256, n_ctx // 4)
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        kept = list(self.messages)
        while True:
            ids = self.prompt_ids(sys_msg + kept + [user])
            if len(ids) + reserve <= n_ctx or not kept:
                break
            # drop the oldest user turn together with its reply
            cut = 2 if len(kept) >= 2 and kept[1]["role"] == "assistant" else 1
            del kept[:cut]
        if len(ids) >= n_ctx:
            raise ContextError(f"the message needs {len(ids)} tokens with the system prompt, but the context holds "
                               f"{n_ctx}: shorten it or raise the context size (-c)")
        return ids, kept

    # -- a turn ------------------------------------------------------------------------------------
    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the reply. When the iterator is exhausted the reply is part of the
        conversation; if it is abandoned (e.g. Ctrl-C) the turn is discarded."""
        user = {"role": "user", "content": text}
        ids, kept = self._fit(user)
        dropped = len(self.messages) - len(kept)
        stats = GenerationStats()
        budget = self.model.n_ctx - len(ids)
        n = budget if self.max_tokens < 0 else min(self.max_tokens, budget)
        pieces: list[str] = []
        for piece in stream_tokens(self.model, ids, n, self.params, self.stop, stats):
            pieces.append(piece)
            yield piece
        reply = "".join(pieces)
        self.messages = kept + [user, {"role": "assistant", "content": reply}]
        self.last = TurnResult(reply, stats, dropped)

    def clear(self) -> None:
        self.messages.clear()
        self.model.cache.clear()


def render_ids(model, template: ChatTemplate, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Render and tokenize with control tokens parsed; exactly one BOS when the model wants one
    (templates usually write bos_token themselves, llama.cpp would add a second)."""
    text = template.render(messages, add_generation_prompt=add_generation_prompt)
    tok = model.tokenizer
    ids = tok.encode(text, add_special=False, parse_special=True)
    if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids.insert(0, tok.bos_id)
    return ids


def _check_messages(messages) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise EdgeLMError(f"message {i} needs 'role' and 'content'")
        out.append({"role": str(m["role"]), "content": m["content"] if m["content"] is not None else ""})
    return out


def chat_completion(model, messages, stream: bool = False, max_tokens: int | None = None,
                    stop: str | list[str] | None = None, chat_template: str | None = None, **sampling):
    """OpenAI-style chat completion (the shape llama-cpp-python's create_chat_completion returns)."""
    msgs = _check_messages(messages)
    template = template_for(model.gguf.metadata, model.tokenizer, chat_template)
    ids = render_ids(model, template, msgs)
    if len(ids) >= model.n_ctx:
        raise ContextError(f"the messages need {len(ids)} tokens, the context holds {model.n_ctx}")
    budget = model.n_ctx - len(ids)
    n = budget if max_tokens is None or max_tokens < 0 else min(max_tokens, budget)
    params = SamplingParams().with_(**sampling)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    stats = model.last_stats = GenerationStats()
    pieces = stream_tokens(model, ids, n, params, stops, stats)
    meta = dict(id=f"chatcmpl-{uuid.uuid4().hex[:24]}", created=int(time.time()), model=model.path)

    def finish():
        return "length" if stats.stop_reason in ("length", "context") else "stop"

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
