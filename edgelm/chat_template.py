"""Chat templates: the GGUF's own `tokenizer.chat_template` (Jinja2, untrusted input: rendered in a sandbox with
time and size limits, see template_sandbox), or a built-in template picked from the model's special tokens when it
has none.
"""
from __future__ import annotations

import os

from .template_sandbox import ChatTemplateError, LimitExceeded, Limits, compile_template, render_bounded, short_error

__all__ = ["BUILTIN_TEMPLATES", "ChatTemplate", "ChatTemplateError", "template_for"]

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


class ChatTemplate:
    """A chat template, compiled once and rendered under a time budget and a size cap.

    max_seconds: wall-clock budget of one render (default: $EDGELM_TEMPLATE_TIMEOUT, else 1 s).
    max_output_bytes: cap on the rendered text and on any single string or list the template builds
    (default: $EDGELM_TEMPLATE_MAX_BYTES, else 1 MiB). The process's resident memory may also grow by at most
    MEMORY_HEADROOM_BYTES during a render. Going past any of them raises a one-line ChatTemplateError naming
    the template. The limits hold on any thread: they are checked inside the render itself (template_sandbox).
    """

    def __init__(self, source: str, name: str, bos_token: str = "", eos_token: str = "",
                 max_seconds: float | None = None, max_output_bytes: int | None = None):
        self.source, self.name = source, name
        self.bos_token, self.eos_token = bos_token, eos_token
        self.limits = Limits.resolve(max_seconds, max_output_bytes)
        try:
            self._template = compile_template(source, self.limits)
        except LimitExceeded as e:
            raise ChatTemplateError(f"chat template {name} {e}") from None
        except Exception as e:  # jinja2 TemplateSyntaxError and friends
            raise ChatTemplateError(f"chat template {name} does not parse: {short_error(e)}") from None

    @property
    def max_seconds(self) -> float:
        return self.limits.max_seconds

    @property
    def max_output_bytes(self) -> int:
        return self.limits.max_output_bytes

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        # transformers always defines `tools` and `documents` (None when not given): templates test
        # `tools is not none`, which is true for an undefined variable and would render an empty tools section.
        extra = {"tools": None, "documents": None, **extra}
        try:
            return render_bounded(self._template, self.limits, messages=messages,
                                  add_generation_prompt=add_generation_prompt,
                                  bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except LimitExceeded as e:
            raise ChatTemplateError(f"chat template {self.name} {e}") from None
        except RecursionError:
            raise ChatTemplateError(f"chat template {self.name} failed to render: it recursed too deeply") from None
        except MemoryError:
            raise ChatTemplateError(f"chat template {self.name} failed to render: out of memory") from None
        except ChatTemplateError as e:
            raise ChatTemplateError(f"chat template {self.name} raised an error: {e}") from None
        except Exception as e:
            raise ChatTemplateError(f"chat template {self.name} failed to render: {short_error(e)}") from None


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
