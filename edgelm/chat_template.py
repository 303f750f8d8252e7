"""Chat templates: the GGUF's own `tokenizer.chat_template` (Jinja2, rendered in a sandbox because the file is
untrusted input), or a built-in template picked from the model's special tokens when it has none.

The rendering environment follows transformers' (utils/chat_template_utils.py): trim_blocks and lstrip_blocks,
the loopcontrols extension, `raise_exception`, `strftime_now`, and a `tojson` that keeps non-ASCII text.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache

from .errors import EdgeLMError

# Built-in templates, written for edgelm from each family's documented prompt format.
BUILTIN_TEMPLATES: dict[str, str] = {
    # ChatML (<|im_start|>role\n...<|im_end|>\n): Qwen, SmolLM, many fine-tunes.
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Gemma (<start_of_turn>user / model ... <end_of_turn>); a system message is folded into the first user turn,
    # as Gemma 3's own template does.
    "gemma": (
        "{{ bos_token }}"
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set prefix = messages[0]['content'] + '\n\n' %}{% set rest = messages[1:] %}"
        "{% else %}{% set prefix = '' %}{% set rest = messages %}{% endif %}"
        "{% for m in rest %}"
        "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + (m['content'] | trim) + '<end_of_turn>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    # Llama 3 (<|start_header_id|>role<|end_header_id|>\n\n ... <|eot_id|>).
    "llama3": (
        "{{ bos_token }}{% for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + (m['content'] | trim) + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Phi-3 (<|user|>\n ... <|end|>\n<|assistant|>\n).
    "phi3": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}

# Which built-in fits a model without a template: the first whose marker token is in the vocabulary.
_MARKERS = [("gemma", "<start_of_turn>"), ("llama3", "<|start_header_id|>"), ("chatml", "<|im_start|>"),
            ("phi3", "<|assistant|>")]
_ARCH_DEFAULT = {"gemma3": "gemma", "gemma2": "gemma", "gemma": "gemma", "llama": "chatml", "phi3": "phi3"}


class ChatTemplateError(EdgeLMError):
    """The template could not be parsed or rendered."""


class ChatTemplate:
    def __init__(self, source: str, name: str, bos_token: str = "", eos_token: str = ""):
        self.source, self.name = source, name
        self.bos_token, self.eos_token = bos_token, eos_token
        try:
            self._template = _environment().from_string(source)
        except Exception as e:  # jinja2 TemplateSyntaxError and friends
            raise ChatTemplateError(f"chat template {name} does not parse: {_short(e)}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        # transformers always defines `tools` and `documents` (None when not given): templates test
        # `tools is not none`, which is true for an undefined variable and would render an empty tools section.
        extra = {"tools": None, "documents": None, **extra}
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except Exception as e:
            raise ChatTemplateError(f"chat template {self.name} failed to render: {_short(e)}") from None


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}".rstrip(": ")


def _raise_exception(message):
    raise ChatTemplateError(str(message))


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=1)
def _environment():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def template_for(metadata: dict, tokenizer, override: str | None = None) -> ChatTemplate:
    """The template to use: `override` (a built-in name or a file path), else the GGUF's, else a built-in
    chosen from the vocabulary's marker tokens (then the architecture)."""
    bos = tokenizer.token_text(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    eos = tokenizer.token_text(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
    if override:
        if override in BUILTIN_TEMPLATES:
            return ChatTemplate(BUILTIN_TEMPLATES[override], f"'{override}' (built-in)", bos, eos)
        if os.path.isfile(override):
            with open(override, encoding="utf-8") as f:
                return ChatTemplate(f.read(), override, bos, eos)
        raise ChatTemplateError(f"chat template {override}: not a file, nor a built-in name "
                                f"({', '.join(BUILTIN_TEMPLATES)})")
    source = metadata.get("tokenizer.chat_template")
    if isinstance(source, str) and source.strip():
        return ChatTemplate(source, "from the GGUF (tokenizer.chat_template)", bos, eos)
    vocab = tokenizer.token_to_id
    for name, marker in _MARKERS:
        if marker in vocab:
            return ChatTemplate(BUILTIN_TEMPLATES[name], f"'{name}' (built-in)", bos, eos)
    name = _ARCH_DEFAULT.get(metadata.get("general.architecture", ""), "chatml")
    return ChatTemplate(BUILTIN_TEMPLATES[name], f"'{name}' (built-in)", bos, eos)
