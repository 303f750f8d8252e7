"""Hostile chat templates, one fresh process each: how long each render takes to fail, the process's peak
resident memory above its level before the render, and the one-line error. Also the cost of the render limits
on an ordinary template (SmolLM2's own, against plain Jinja's ImmutableSandboxedEnvironment).

    python3 tools/hostile_templates.py            # all of tests/test_chat_safety.py's HOSTILE templates
    python3 tools/hostile_templates.py lipsum pow # some of them

Targets (issue 9): each ends within 2 s with a one-line ChatTemplateError, RSS < 200 MiB above the start.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The child: render one template, report time, peak RSS growth (ru_maxrss is the process's peak) and the error.
CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from tests.test_chat_safety import HOSTILE
from edgelm.chat_template import ChatTemplate, ChatTemplateError
name = sys.argv[2]
t = ChatTemplate("{{ messages[0]['content'] }}", "warm-up"); t.render([{"role": "user", "content": "hi"}])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.monotonic()
try:
    ChatTemplate(HOSTILE[name], name).render([{"role": "user", "content": "hi"}])
    outcome = "RENDERED"
except ChatTemplateError as e:
    outcome = str(e)
elapsed = time.monotonic() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": elapsed, "rss_growth_mib": (peak - base) / 1024, "outcome": outcome}))
"""


def run_one(name: str) -> dict:
    t0 = time.monotonic()
    try:
        r = subprocess.run([sys.executable, "-c", CHILD, ROOT, name], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return {"seconds": time.monotonic() - t0, "rss_growth_mib": float("nan"), "outcome": "HUNG (30 s)"}
    if r.returncode != 0 or not r.stdout.strip():
        return {"seconds": time.monotonic() - t0, "rss_growth_mib": float("nan"),
                "outcome": f"CRASHED rc={r.returncode}: {r.stderr.strip().splitlines()[-1:]}"}
    return json.loads(r.stdout)


def overhead() -> tuple[float, float]:
    """ms per render of SmolLM2's template on 10 messages: edgelm's bounded render, plain sandboxed Jinja."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from edgelm.catalog import resolve
    from edgelm.chat_template import ChatTemplate
    from edgelm.gguf_file import GGUFFile
    source = GGUFFile(str(resolve("smollm2-135m"))).metadata["tokenizer.chat_template"]
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 20} for i in range(10)]
    bounded = ChatTemplate(source, "smollm2")
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    plain_t = plain.from_string(source)
    assert bounded.render(messages) == plain_t.render(messages=messages, add_generation_prompt=True, tools=None,
                                                      documents=None, bos_token="", eos_token="")

    def per_call(f, n=200):
        f()
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t0) / n * 1e3
    return (per_call(lambda: bounded.render(messages)),
            per_call(lambda: plain_t.render(messages=messages, add_generation_prompt=True, tools=None,
                                             documents=None, bos_token="", eos_token="")))


def main(names: list[str]) -> int:
    from tests.test_chat_safety import HOSTILE
    names = names or sorted(HOSTILE)
    bad = 0
    for name in names:
        r = run_one(name)
        ok = r["seconds"] < 2 and r["rss_growth_mib"] < 200 and r["outcome"].startswith(f"chat template {name} ")
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {name:26s} {r['seconds']:5.2f} s {r['rss_growth_mib']:7.1f} MiB  "
              f"{r['outcome'][:110]}", flush=True)
    bounded_ms, plain_ms = overhead()
    print(f"{len(names) - bad}/{len(names)} within target; SmolLM2 template, 10 messages: bounded render "
          f"{bounded_ms:.3f} ms, plain sandboxed Jinja {plain_ms:.3f} ms")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
