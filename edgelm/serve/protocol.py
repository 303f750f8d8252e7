"""The OpenAI wire format: request bodies (pydantic models: a malformed body is refused with the field and the
rule, before any work) and the response objects, as OpenAI's API reference and llama-server
(llama.cpp tools/server/README.md: /tokenize, /detokenize, the `timings` object) define them."""
from __future__ import annotations

import json
import time
import uuid
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import EdgeLMError
from ..runtime.generate import clean_text

from .engine import Done, TokenInfo

MAX_STOPS = 16
MAX_LOGPROBS = 20


class _Body(BaseModel):
    # fields OpenAI clients send that change nothing here (user, metadata, store, ...) are ignored
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    # llama-server's extensions
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    repeat_last_n: int | None = Field(None, ge=-1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("one choice per request (n = 1)")
        return v
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted at their neutral value only: there is no such sampler here (repeat_penalty is)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _neutral(cls, v: float) -> float:
        if v:
            raise ValueError("not supported, only 0 is accepted (repeat_penalty is)")
        return v

    def sampling(self) -> dict:
        return {k: getattr(self, k) for k in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty",
                                              "repeat_last_n", "seed") if getattr(self, k) is not None}

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise EdgeLMError(f"stop: at most {MAX_STOPS} stop strings, got {len(stops)}")
        return [clean_text(s) for s in stops]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class Message(_Body):
    model_config = ConfigDict(extra="allow")      # name, tool_call_id ...: passed to the template as they are
    role: str = Field(min_length=1)
    content: Union[str, list[dict], None] = None

    def for_template(self, index: int) -> dict:
        content = self.content
        if isinstance(content, list):             # OpenAI content parts: the text parts, in order
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise EdgeLMError(f"messages.{index}.content: only text parts are supported, got a "
                                      f"{str(part.get('type'))[:40]!r} part")
                texts.append(part["text"])
            content = "".join(texts)
        m = {k: v for k, v in (self.model_extra or {}).items() if isinstance(v, (str, int, float, bool))}
        m.update(role=self.role, content=content or "")
        # text that is not valid Unicode (a lone surrogate from a JSON \ud800) becomes U+FFFD, as everywhere
        return {k: clean_text(v) if isinstance(v, str) else v for k, v in m.items()}


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list | None = None

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def n_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Generation):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: int | None = Field(16, ge=1)     # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v):
        if v not in (None, 1):
            raise ValueError("not supported (only 1)")
        return v

    def one_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and not isinstance(p[0], int):
            if len(p) != 1:
                raise EdgeLMError(f"prompt: one prompt per request, got a list of {len(p)}")
            p = p[0]
        if isinstance(p, str) and not p:
            raise EdgeLMError("prompt: the prompt is empty")
        if isinstance(p, list) and not p:
            raise EdgeLMError("prompt: the list of token ids is empty")
        return p


class TokenizeRequest(_Body):
    content: str
    add_special: bool = False
    parse_special: bool = False       # text is text unless asked (user text never becomes control tokens)
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int]


# -- responses ------------------------------------------------------------------------------------------------

def error_body(message: str, type_: str = "invalid_request_error", code: str | int | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class Reply:
    """The ids and shapes shared by the chunks and the final object of one response."""

    def __init__(self, kind: Literal["chat", "text"], model_id: str, tokenizer):
        self.kind, self.tok = kind, tokenizer
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.meta = dict(id=f"{prefix}-{uuid.uuid4().hex[:24]}", created=int(time.time()), model=model_id)
        self.text_offset = 0       # completions' logprobs: where each token's text starts
        # a text piece's event without logprobs, the one sent per token: the JSON around the text made once
        sample = json.dumps(self.chunk("\x00"), ensure_ascii=False)
        key = '"content": "\\u0000"' if kind == "chat" else '"text": "\\u0000"'
        head, tail = sample.rsplit(key, 1)
        self._event_head = "data: " + head + key.split(":")[0] + ": "
        self._event_tail = tail + "\n\n"

    def text_event(self, text: str) -> str:
        """The server-sent event of a text piece (no logprobs): `data: {chunk}`."""
        return self._event_head + json.dumps(text, ensure_ascii=False) + self._event_tail

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    def chunk(self, text: str | None, tokens: list[TokenInfo] | None = None, finish: str | None = None,
              first: bool = False) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": self.chat_logprobs(tokens), "finish_reason": finish}
            return dict(self.meta, object="chat.completion.chunk", choices=[choice])
        choice = {"index": 0, "text": text or "", "logprobs": self.text_logprobs(tokens), "finish_reason": finish}
        return dict(self.meta, object="text_completion", choices=[choice])

    def usage_chunk(self, done: Done) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return dict(self.meta, object=obj, choices=[], usage=usage(done), timings=timings(done))

    def final(self, text: str, tokens: list[TokenInfo] | None, done: Done) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": self.chat_logprobs(tokens), "finish_reason": done.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": self.text_logprobs(tokens),
                      "finish_reason": done.finish_reason}
        return dict(self.meta, object=self.object, choices=[choice], usage=usage(done), timings=timings(done))

    # logprobs: chat's {"content": [{token, logprob, bytes, top_logprobs}]}, completions' legacy lists
    def _text(self, tid: int) -> tuple[str, list[int]]:
        b = self.tok.token_bytes(tid)
        return b.decode("utf-8", errors="replace"), list(b)

    def chat_logprobs(self, tokens: list[TokenInfo] | None):
        if tokens is None:
            return None
        content = []
        for t in tokens:
            text, b = self._text(t.id)
            top = []
            for i, lp in t.top:
                tt, tb = self._text(i)
                top.append({"token": tt, "logprob": lp, "bytes": tb})
            content.append({"token": text, "logprob": t.logprob, "bytes": b, "top_logprobs": top})
        return {"content": content}

    def text_logprobs(self, tokens: list[TokenInfo] | None):
        if tokens is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in tokens:
            text, _ = self._text(t.id)
            out["tokens"].append(text)
            out["token_logprobs"].append(t.logprob)
            out["top_logprobs"].append({self._text(i)[0]: lp for i, lp in t.top})
            out["text_offset"].append(self.text_offset)
            self.text_offset += len(text)
        return out


def usage(done: Done) -> dict:
    s = done.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.generated_tokens,
            "total_tokens": s.prompt_tokens + s.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


def timings(done: Done) -> dict:
    """llama-server's `timings`: cache_n tokens reused, prompt_n evaluated, predicted_n generated."""
    s = done.stats
    return {"cache_n": done.cached_tokens, "prompt_n": s.prompt_evaluated, "prompt_ms": 1000 * s.prompt_s,
            "prompt_per_second": s.prompt_tps, "predicted_n": s.generated_tokens,
            "predicted_ms": 1000 * s.generate_s, "predicted_per_second": s.generate_tps}
