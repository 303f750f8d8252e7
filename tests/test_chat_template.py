"""Chat templates: edgelm's sandboxed Jinja rendering against transformers' own renderer (golden file made by
tools/make_chat_golden.py), the built-in templates against the official templates they stand in for, errors,
the sandbox, and how the template is chosen (GGUF's own, built-in by marker token, --chat-template)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgelm.chat_template import BUILTIN_TEMPLATES, ChatTemplate, ChatTemplateError, template_for
from edgelm.errors import EdgeLMError
from edgelm.gguf_file import GGUFFile

from .conftest import run_cli

GOLDEN = json.loads((Path(__file__).parent / "golden" / "chat_templates.json").read_text(encoding="utf-8"))
TEMPLATES, MESSAGES, CASES = GOLDEN["templates"], GOLDEN["messages"], GOLDEN["cases"]


def _case_id(c: dict) -> str:
    return f"{c['template']}-{c['messages']}-{'gen' if c['add_generation_prompt'] else 'nogen'}"


def _render(source: str, template: str, case: dict, name: str = "test") -> str:
    t = TEMPLATES[template]
    return ChatTemplate(source, name, t["bos_token"], t["eos_token"]).render(
        MESSAGES[case["messages"]], add_generation_prompt=case["add_generation_prompt"])


def test_golden_covers_what_it_should():
    assert set(TEMPLATES) == {"smollm2-gguf", "gemma3-official", "llama3-official", "qwen2.5-official", "env-probe"}
    assert len(CASES) == len(TEMPLATES) * len(MESSAGES) * 2
    assert "transformers" in GOLDEN["reference"]
    # the cases are not trivially alike: each template renders each message list differently
    for name in TEMPLATES:
        texts = [c["expected"] for c in CASES if c["template"] == name]
        assert len(set(texts)) == len(texts), name


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_render_matches_transformers(case):
    source = TEMPLATES[case["template"]]["source"]
    assert _render(source, case["template"], case) == case["expected"]


def test_golden_smollm2_template_is_the_ggufs(smollm2_path):
    meta = GGUFFile(smollm2_path).metadata
    t = TEMPLATES["smollm2-gguf"]
    assert meta["tokenizer.chat_template"] == t["source"]
    tokens = meta["tokenizer.ggml.tokens"]
    assert tokens[int(meta["tokenizer.ggml.bos_token_id"])] == t["bos_token"]
    assert tokens[int(meta["tokenizer.ggml.eos_token_id"])] == t["eos_token"]


# -- built-in templates against the official ones they replace ----------------------------------------------------
@pytest.mark.parametrize("case", [c for c in CASES if c["template"] == "gemma3-official"], ids=_case_id)
def test_builtin_gemma_renders_like_gemma3_official(case):
    assert _render(BUILTIN_TEMPLATES["gemma"], "gemma3-official", case) == case["expected"]


@pytest.mark.parametrize("case", [c for c in CASES if c["template"] == "llama3-official"], ids=_case_id)
def test_builtin_llama3_renders_like_llama3_official(case):
    assert _render(BUILTIN_TEMPLATES["llama3"], "llama3-official", case) == case["expected"]


@pytest.mark.parametrize("case", [c for c in CASES if c["template"] in ("qwen2.5-official", "smollm2-gguf")
                                  and MESSAGES[c["messages"]][0]["role"] == "system"], ids=_case_id)
def test_builtin_chatml_renders_like_chatml_models_given_a_system_prompt(case):
    # Qwen2.5 and SmolLM2 insert their own default system prompt when there is none; with one they are plain ChatML
    assert _render(BUILTIN_TEMPLATES["chatml"], case["template"], case) == case["expected"]


def test_builtin_templates_parse_and_render_every_message_list():
    for name, src in BUILTIN_TEMPLATES.items():
        for msgs in MESSAGES.values():
            text = ChatTemplate(src, name).render(msgs)
            assert msgs[-1]["content"].strip() in text


# -- errors ---------------------------------------------------------------------------------------------------------
def test_syntax_error_names_the_template():
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate("{% for m in messages %}{{ m['content'] }}", "my-template.jinja")
    msg = str(e.value)
    assert "my-template.jinja" in msg and "does not parse" in msg and "endfor" in msg
    assert "\n" not in msg


def test_syntax_error_in_a_template_file_names_the_file(tmp_path, smollm2):
    path = tmp_path / "broken.jinja"
    path.write_text("{{ messages[0]['content'] }", encoding="utf-8")
    with pytest.raises(ChatTemplateError, match="broken.jinja"):
        template_for(smollm2.gguf.metadata, smollm2.tokenizer, str(path))


def test_raise_exception_carries_the_templates_message():
    t = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('First message must be from the "
                     "user, got ' + messages[0]['role']) }}{% endif %}ok", "strict")
    assert t.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError) as e:
        t.render([{"role": "assistant", "content": "x"}])
    assert "First message must be from the user, got assistant" in str(e.value)
    assert "strict" in str(e.value)


def test_gemma3_official_refuses_non_alternating_roles():
    t = TEMPLATES["gemma3-official"]
    tmpl = ChatTemplate(t["source"], "gemma3", t["bos_token"], t["eos_token"])
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate user/assistant"):
        tmpl.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{% set x = [] %}{{ x.append(1) }}",                  # immutable sandbox: no mutating methods
    "{{ messages[0].update({'role': 'system'}) }}",
])
def test_sandbox_refuses_unsafe_access(source):
    messages = [{"role": "user", "content": "hi"}]
    t = ChatTemplate(source, "hostile")
    with pytest.raises(ChatTemplateError) as e:
        t.render(messages)
    assert isinstance(e.value, EdgeLMError)
    assert "SecurityError" in str(e.value) and "unsafe" in str(e.value) and "hostile" in str(e.value)
    assert messages == [{"role": "user", "content": "hi"}]


# -- choosing the template ------------------------------------------------------------------------------------------
def test_gemma_without_template_gets_builtin_gemma(gemma):
    assert "tokenizer.chat_template" not in gemma.gguf.metadata
    t = template_for(gemma.gguf.metadata, gemma.tokenizer)
    assert t.source == BUILTIN_TEMPLATES["gemma"]
    assert "gemma" in t.name and "built-in" in t.name
    assert t.bos_token == "<bos>"
    assert t.render([{"role": "user", "content": "Hi"}]) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")


def test_smollm2_uses_its_own_template(smollm2):
    t = template_for(smollm2.gguf.metadata, smollm2.tokenizer)
    assert t.source == smollm2.gguf.metadata["tokenizer.chat_template"]
    assert "GGUF" in t.name
    assert (t.bos_token, t.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_override_by_name_and_by_file(smollm2, gemma, tmp_path):
    t = template_for(gemma.gguf.metadata, gemma.tokenizer, "chatml")
    assert t.source == BUILTIN_TEMPLATES["chatml"] and "chatml" in t.name
    assert t.render([{"role": "user", "content": "Hi"}]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}", encoding="utf-8")
    t = template_for(smollm2.gguf.metadata, smollm2.tokenizer, str(path))
    assert t.name == str(path)
    assert t.render([{"role": "user", "content": "Hi"}]) == "[user] Hi\n"
    with pytest.raises(ChatTemplateError, match="not a file, nor a built-in name.*chatml"):
        template_for(smollm2.gguf.metadata, smollm2.tokenizer, "no-such-template")


def test_cli_chat_template_override(gemma_path):
    r = run_cli("chat", "-m", gemma_path, "--chat-template", "chatml", "-n", "4",
                input="/show template\n/show info\n/bye\n", timeout=120)
    assert r.returncode == 0, r.stderr
    assert BUILTIN_TEMPLATES["chatml"] in r.stdout
    assert "'chatml' (built-in)" in r.stdout
    r = run_cli("chat", "-m", gemma_path, input="/show info\n/bye\n", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "'gemma' (built-in)" in r.stdout


def test_cli_unknown_chat_template_is_one_line_error(gemma_path):
    r = run_cli("chat", "-m", gemma_path, "--chat-template", "no-such-template", input="/bye\n", timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "edgelm: error: chat template no-such-template: not a file, nor a built-in name (chatml, gemma, llama3, phi3)"]
