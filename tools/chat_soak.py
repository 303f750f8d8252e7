"""A long chat in a small context: every turn must be answered, and resident memory must stay flat.

    python tools/chat_soak.py [--model smollm2-135m] [--ctx 512] [--turns 1000] [--reply 16]

Each turn sends a short user message through one Conversation (the REPL's code path: oldest turns dropped
when the context is full, the kept ones reused through a context shift). Prints RSS at turns 1, 50, 500 and
the last, the growth after turn 50 (the issue's bar: within 5 MiB), and how many turns reused the cache
after dropping messages. Exit status 1 if a turn got no reply or RSS grew more than 5 MiB after turn 50.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import psutil

import edgelm
from edgelm.chat import Conversation
from edgelm.runtime.sampling import SamplingParams

TOPICS = ["the sea", "mountains", "bread", "a red bicycle", "winter", "owls", "the moon", "tea", "a library",
          "rain on a tin roof", "a lighthouse", "chess"]


def run(model: str, ctx: int, turns: int, reply: int, report=print) -> dict:
    m = edgelm.load(model, n_ctx=ctx)
    conv = Conversation(m, system="You are a friendly assistant. Answer in one short sentence.",
                        params=SamplingParams(temperature=0.7, top_k=40, top_p=0.95, seed=1), max_tokens=reply)
    proc = psutil.Process()
    rss, empty, reused, dropped_turns = {}, 0, 0, 0
    t0 = time.perf_counter()
    for i in range(1, turns + 1):
        text = "".join(conv.send(f"Turn {i}: tell me one thing about {TOPICS[i % len(TOPICS)]}."))
        st = conv.last.stats
        empty += not text.strip() and st.generated_tokens == 0
        if conv.last.dropped_messages:
            dropped_turns += 1
            reused += st.prompt_evaluated < st.prompt_tokens // 2
        if i in (1, 50, 500, turns) or i % 100 == 0:
            rss[i] = proc.memory_info().rss
            report(f"turn {i:5d}: RSS {rss[i] / 2**20:7.1f} MiB, prompt {st.prompt_tokens} tokens "
                   f"({st.prompt_evaluated} evaluated), {time.perf_counter() - t0:6.0f} s")
    growth = (rss[turns] - rss[min(50, turns)]) / 2**20
    return dict(turns=turns, ctx=ctx, unanswered=empty, turns_dropping=dropped_turns, reused_by_shift=reused,
                rss_mib={k: round(v / 2**20, 1) for k, v in rss.items()}, growth_after_50_mib=round(growth, 2),
                seconds=round(time.perf_counter() - t0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--turns", type=int, default=1000)
    ap.add_argument("--reply", type=int, default=16, help="max tokens per reply")
    a = ap.parse_args()
    r = run(a.model, a.ctx, a.turns, a.reply)
    print(json.dumps(r))
    return 0 if r["unanswered"] == 0 and r["growth_after_50_mib"] <= 5 else 1


if __name__ == "__main__":
    sys.exit(main())
