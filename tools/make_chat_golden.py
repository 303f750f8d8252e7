"""Make tests/golden/chat_templates.json: chat templates rendered by transformers' own renderer.

transformers (utils/chat_template_utils.render_jinja_template, the function behind
`tokenizer.apply_chat_template(..., tokenize=False)`) is the independent reference; edgelm's ChatTemplate must
render every case to the same text. Run it with the reference venv, from the repository root:

    ~/.cache/edgelm-reference/venv/bin/python tools/make_chat_golden.py [--models-dir DIR]

Regenerate when a template or message list below changes, or when SmolLM2's GGUF changes (the test checks that
the stored SmolLM2 template is still the one in the GGUF).

Templates (source text, and the BOS/EOS strings given to the renderer as `bos_token` / `eos_token`):
  - smollm2-gguf: `tokenizer.chat_template` read from SmolLM2-135M-Instruct.Q4_1.gguf (edgelm's GGUF reader).
  - gemma3-official: Gemma 3's instruct template (google/gemma-3-*-it tokenizer_config.json "chat_template"), as
    quoted verbatim, JSON-escaped, in ShishirPatil/gorilla
    berkeley-function-call-leaderboard/bfcl_eval/model_handler/local_inference/gemma.py (GemmaHandler docstring).
  - llama3-official: Meta-Llama-3-8B-Instruct's template. Source: ggml-org/llama.cpp tests/test-chat-template.cpp
    (case "Llama-3", which drops the `{% if add_generation_prompt %}` guard around the final header); the guarded
    form used here is the one vLLM logs as the model's default template and that many repositories copy verbatim.
  - qwen2.5-official: Qwen2.5-7B-Instruct's template, as quoted verbatim (JSON-escaped Swift literal) in minja-swift's
    Tests ChatTemplateTests.swift (`Qwen_Qwen2_5_7B_Instruct_Template`), the Swift port of google/minja.
  - env-probe: a small template written here that exercises the rendering environment itself (namespace, break /
    continue, trim_blocks / lstrip_blocks, tojson with non-ASCII text and indent, and the `tools` / `documents`
    variables that transformers always defines, as None).

Every template is rendered for several message lists (with and without a system message, multi-turn, non-ASCII
content with surrounding whitespace, ending on an assistant turn) with add_generation_prompt True and False.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "golden" / "chat_templates.json"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# JSON string values (as in a tokenizer_config.json), decoded with json.loads below.
GEMMA3_JSON = r'''"{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"'''

LLAMA3_JSON = r'''"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"'''

QWEN25_JSON = r'''"{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"'''

ENV_PROBE = """\
{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}
    {%- if m.role == 'system' %}{% continue %}{% endif -%}
    {%- set ns.n = ns.n + 1 -%}
    [{{ ns.n }}:{{ m['role'] }}:{{ m.content | trim }}]
    {%- if ns.n >= 3 %}{% break %}{% endif -%}
{%- endfor %}

    {% if messages | length > 1 %}
  several
    {% endif %}
tools none={{ tools is none }} defined={{ tools is defined }}; documents none={{ documents is none }}
{% if tools is not none %}TOOLS {{ tools | length }}{% endif %}
json={{ messages | tojson }}
last={{ messages[-1] | tojson(indent=2) }}
bos={{ bos_token }} eos={{ eos_token }}
{% if add_generation_prompt %}<generate>{% endif %}
"""

MESSAGES = {
    "user": [{"role": "user", "content": "What is the capital of France?"}],
    "system_user": [{"role": "system", "content": "You are a concise assistant."},
                    {"role": "user", "content": "Hello!"}],
    "multi_turn": [{"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Tell me a joke."}],
    "system_multi_turn": [{"role": "system", "content": "Answer in one line.\nBe polite."},
                          {"role": "user", "content": "Name a prime number."},
                          {"role": "assistant", "content": "7"},
                          {"role": "user", "content": "Another one?"}],
    "non_ascii": [{"role": "user", "content": "  Ça va ? 日本語で答えて 🙂\n"},
                  {"role": "assistant", "content": "Très bien, merci ! 😀 "},
                  {"role": "user", "content": "Grüße aus Köln — «ok» \t"}],
    "ends_with_assistant": [{"role": "user", "content": "2+2?"},
                            {"role": "assistant", "content": "4"}],
}


def smollm2_template(models_dir: Path) -> tuple[str, str, str]:
    from edgelm.gguf_file import GGUFFile
    meta = GGUFFile(str(models_dir / SMOLLM2_FILE)).metadata
    tokens = meta["tokenizer.ggml.tokens"]
    bos = tokens[int(meta["tokenizer.ggml.bos_token_id"])]
    eos = tokens[int(meta["tokenizer.ggml.eos_token_id"])]
    return meta["tokenizer.chat_template"], bos, eos


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models-dir", type=Path, default=Path.home() / ".cache" / "edgelm" / "models")
    args = ap.parse_args()

    import jinja2
    import transformers
    from transformers.utils.chat_template_utils import render_jinja_template

    smol_src, smol_bos, smol_eos = smollm2_template(args.models_dir)
    templates = {
        "smollm2-gguf": dict(source=smol_src, bos_token=smol_bos, eos_token=smol_eos,
                             origin=f"tokenizer.chat_template of {SMOLLM2_FILE}"),
        "gemma3-official": dict(source=json.loads(GEMMA3_JSON), bos_token="<bos>", eos_token="<eos>",
                                origin="Gemma 3 instruct tokenizer_config.json, quoted in ShishirPatil/gorilla "
                                       "bfcl_eval/model_handler/local_inference/gemma.py"),
        "llama3-official": dict(source=json.loads(LLAMA3_JSON), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                origin="Meta-Llama-3-8B-Instruct tokenizer_config.json (cf. ggml-org/llama.cpp "
                                       "tests/test-chat-template.cpp, case Llama-3)"),
        "qwen2.5-official": dict(source=json.loads(QWEN25_JSON), bos_token="", eos_token="<|im_end|>",
                                 origin="Qwen2.5-7B-Instruct tokenizer_config.json, quoted in minja-swift "
                                        "ChatTemplateTests.swift"),
        "env-probe": dict(source=ENV_PROBE, bos_token="<s>", eos_token="</s>",
                          origin="written for this test: rendering-environment features"),
    }

    cases = []
    for tname, t in templates.items():
        for mname, messages in MESSAGES.items():
            for agp in (True, False):
                rendered, _ = render_jinja_template(conversations=[messages], chat_template=t["source"],
                                                    add_generation_prompt=agp, bos_token=t["bos_token"],
                                                    eos_token=t["eos_token"])
                cases.append(dict(template=tname, messages=mname, add_generation_prompt=agp, expected=rendered[0]))

    data = dict(
        generator="tools/make_chat_golden.py",
        reference=f"transformers {transformers.__version__} "
                  "(transformers.utils.chat_template_utils.render_jinja_template), "
                  f"jinja2 {jinja2.__version__}",
        templates=templates, messages=MESSAGES, cases=cases)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {OUT.relative_to(ROOT)}: {len(templates)} templates, {len(cases)} cases", file=sys.stderr)


if __name__ == "__main__":
    main()
