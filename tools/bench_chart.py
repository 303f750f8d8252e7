"""Chart and tables of edgelm vs llama.cpp from a results file made by tools/run_benchmarks.sh.

    python tools/bench_chart.py docs/img/benchmarks.json -o docs/img/benchmarks.png [--doc docs/benchmarks.md]
    python tools/bench_chart.py --collect RUN_DIR --commit C --settings "THREADS=2 ..." RESULTS.json
                                (run_benchmarks.sh gathers a run into the results file this way)

Draws a PNG with one panel per test (ppN, tgN): tokens/s of edgelm and llama.cpp for each model, with the
ratio edgelm/llama.cpp above each pair. With --doc, rewrites the part of that Markdown file between
`<!-- bench-results:begin -->` and `<!-- bench-results:end -->` with the machine, the side-by-side table,
peak memory, the chart, and the `edgelm bench` table.

Needs matplotlib (`pip install matplotlib`) to draw: a tools-only dependency, not one of edgelm's. --collect
needs llama-cpp-python instead (it records its version), so it runs in the reference venv.

The results file (JSON object): date, edgelm_commit, machine {cpu, cores, cpus, ram_bytes, os, python, numpy,
numba, llama_cpp_python}, load_average_1min {start, end}, threads, rounds, pp, tg, reps, commands [str],
sidebyside [one output of shared/tools/sidebyside.py per model: model, threads, edgelm {pp_ts, tg_ts,
peak_rss_mb}, llamacpp {...}, pp_ratio, tg_ratio, rss_ratio], edgelm_bench [records of `edgelm bench -o json`].
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- bench-results:begin -->", "<!-- bench-results:end -->"
COLORS = {"edgelm": "#2b7bba", "llama.cpp": "#f08a24"}


def model_label(filename: str) -> str:
    """SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct Q4_1"""
    base = os.path.basename(filename)
    base = re.sub(r"\.gguf$", "", base, flags=re.I)
    m = re.match(r"(.*?)[.-]((?:[qQ]\d\w*|[fF]16|[bB][fF]16|[fF]32))$", base)
    return f"{m.group(1)} {m.group(2).upper()}" if m else base


def machine_line(res: dict) -> str:
    m = res["machine"]
    return (f"{m['cpu']}, {m['cores']} cores ({m['cpus']} logical CPUs), {m['ram_bytes'] / 2**30:.0f} GiB RAM, "
            f"{m['os']}")


def draw(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["sidebyside"]
    labels = [model_label(r["model"]) for r in rows]
    tests = [("pp", f"pp{res['pp']}", "prompt processing"), ("tg", f"tg{res['tg']}", "generation")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    width = 0.38
    for ax, (key, name, what) in zip(axes, tests):
        e = [r["edgelm"][f"{key}_ts"] for r in rows]
        p = [r["llamacpp"][f"{key}_ts"] for r in rows]
        xs = range(len(rows))
        be = ax.bar([x - width / 2 for x in xs], e, width, label="edgelm", color=COLORS["edgelm"])
        bp = ax.bar([x + width / 2 for x in xs], p, width, label="llama.cpp", color=COLORS["llama.cpp"])
        top = max(e + p) if e + p else 1
        for bars in (be, bp):
            for b in bars:
                v = b.get_height()
                ax.text(b.get_x() + b.get_width() / 2, v + top * 0.01, f"{v:.0f}" if v >= 10 else f"{v:.1f}",
                        ha="center", va="bottom", fontsize=9)
        for x, r in zip(xs, rows):
            ratio = r.get(f"{key}_ratio") or (r["edgelm"][f"{key}_ts"] / r["llamacpp"][f"{key}_ts"])
            pair = max(r["edgelm"][f"{key}_ts"], r["llamacpp"][f"{key}_ts"])
            ax.text(x, pair + top * 0.08, f"edgelm = {ratio:.2f}×", ha="center", va="bottom", fontsize=9,
                    color="#444444", fontweight="bold")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=9)
        ax.set_ylim(0, top * 1.2)
        ax.set_title(f"{name}: {what}", fontsize=11)
        ax.set_ylabel("tokens / s (higher is better)")
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=2, frameon=False, bbox_to_anchor=(0.5, 0.93))
    m = res["machine"]
    fig.suptitle(f"edgelm vs llama.cpp, {res['threads']} threads — {m['cpu']}, {m['cores']} cores", fontsize=12)
    note = (f"{res['date']}, edgelm {res['edgelm_commit']}; medians of {res['rounds']} interleaved rounds "
            f"(shared/tools/sidebyside.py)\n\"edgelm = x×\": edgelm's tokens/s over llama.cpp's")
    fig.text(0.5, 0.005, note, ha="center", fontsize=8, color="#666666")
    fig.tight_layout(rect=(0, 0.06, 1, 0.90))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_markdown(res: dict, chart_rel: str | None) -> str:
    m = res["machine"]
    pp, tg = f"pp{res['pp']}", f"tg{res['tg']}"
    out = [
        f"Measured {res['date']} on edgelm `{res['edgelm_commit']}`, {res['threads']} threads.",
        "",
        f"- Machine: {machine_line(res)}",
        f"- Software: Python {m['python']}, NumPy {m['numpy']}, Numba {m['numba']}; llama.cpp through "
        f"llama-cpp-python {m['llama_cpp_python']}",
    ]
    load = res.get("load_average_1min") or {}
    if load:
        out += [f"- Load average (1 min) when the run started / ended: {load.get('start', float('nan')):.2f} / "
                f"{load.get('end', float('nan')):.2f} (this run's own load is about {res['threads']}; a start above "
                f"~0.5 means other work was running)"]
    out += [
        "",
        "```sh",
        *res["commands"],
        "```",
        "",
        f"Side by side (medians of {res['rounds']} interleaved rounds; tokens/s, higher is better):",
        "",
        "| model | test | edgelm t/s | llama.cpp t/s | edgelm / llama.cpp |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in res["sidebyside"]:
        for key, name in (("pp", pp), ("tg", tg)):
            out.append(f"| {model_label(r['model'])} | {name} | {r['edgelm'][f'{key}_ts']:.1f} | "
                       f"{r['llamacpp'][f'{key}_ts']:.1f} | {r[f'{key}_ratio']:.2f}× |")
    out += ["", "Peak resident memory of the whole process (`ru_maxrss`, median of the rounds; llama.cpp's is the "
            "Python process that loads llama-cpp-python):", "",
            "| model | edgelm | llama.cpp | edgelm / llama.cpp |", "| --- | ---: | ---: | ---: |"]
    for r in res["sidebyside"]:
        ratio = r.get("rss_ratio")
        out.append(f"| {model_label(r['model'])} | {r['edgelm']['peak_rss_mb']:.0f} MiB | "
                   f"{r['llamacpp']['peak_rss_mb']:.0f} MiB | {f'{ratio:.2f}×' if ratio else '—'} |")
    if chart_rel:
        out += ["", f"![edgelm vs llama.cpp, tokens/s]({chart_rel})"]
    recs = res.get("edgelm_bench") or []
    if recs:
        sys.path.insert(0, REPO)
        from edgelm.commands.bench import md_header, md_row
        out += ["", f"`edgelm bench` alone, right after (mean ± sample std of {res['reps']} runs):", "",
                md_header(), *[md_row(r) for r in recs], ""]
        loads = {os.path.basename(r["model_filename"]): r for r in recs}
        out.append("Load time and peak RSS (the process's high-water mark, so a later model's includes the earlier "
                   "ones' if they were larger) in that run: " + "; ".join(
            f"{name} {r['load_s']:.2f} s, {r['peak_rss_bytes'] / 2**20:.0f} MiB" for name, r in loads.items()) + ".")
    return "\n".join(out)


def update_doc(doc: str, text: str) -> None:
    with open(doc) as f:
        body = f.read()
    if BEGIN not in body or END not in body:
        raise SystemExit(f"{doc}: no {BEGIN} ... {END} markers to write between")
    head, rest = body.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(doc, "w") as f:
        f.write(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def collect(run_dir: str, out: str, commit: str, settings: str) -> None:
    """Gather a run of tools/run_benchmarks.sh (sidebyside.jsonl, bench.json, commands.txt in run_dir) and the
    machine into the results JSON. Run by the Python that has llama-cpp-python, to record its version."""
    import datetime
    import platform
    import subprocess
    import llama_cpp
    import numba
    import numpy
    try:
        out_lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:   # not Linux
        out_lscpu = ""
    lscpu = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in out_lscpu.splitlines() if ":" in ln)}
    ram = 0
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            ram = next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemTotal")), 0)
    cores = int(lscpu.get("Core(s) per socket") or 0) * int(lscpu.get("Socket(s)") or 1) or os.cpu_count()
    machine = dict(cpu=lscpu.get("Model name") or platform.processor(), cores=cores, cpus=os.cpu_count(),
                   ram_bytes=ram, os=f"{platform.system()} {platform.release()}", python=platform.python_version(),
                   numpy=numpy.__version__, numba=numba.__version__, llama_cpp_python=llama_cpp.__version__)
    home = os.path.expanduser("~")
    with open(os.path.join(run_dir, "commands.txt")) as f:
        commands = [f"bash tools/run_benchmarks.sh   # {settings}; it runs:"]
        commands += ["  " + c.replace(home, "~") for c in f.read().splitlines()]
    with open(os.path.join(run_dir, "sidebyside.jsonl")) as f:
        side = [json.loads(ln) for ln in f if ln.strip()]
    with open(os.path.join(run_dir, "bench.json")) as f:
        bench = json.load(f)
    kv = dict(item.split("=", 1) for item in settings.split())
    load = {}
    try:
        with open(os.path.join(run_dir, "loadavg_start")) as f:
            load["start"] = float(f.read().split()[0])
        load["end"] = os.getloadavg()[0]
    except (OSError, ValueError, IndexError):
        pass
    res = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               edgelm_commit=commit, machine=machine, threads=int(kv["THREADS"]), rounds=int(kv["ROUNDS"]),
               pp=int(kv["PP"]), tg=int(kv["TG"]), reps=int(kv["REPS"]), commands=commands,
               load_average_1min=load, sidebyside=side, edgelm_bench=bench)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="results JSON written by tools/run_benchmarks.sh")
    ap.add_argument("-o", "--output", default=os.path.join(REPO, "docs", "img", "benchmarks.png"), help="PNG path")
    ap.add_argument("--doc", help="Markdown file whose results section (between the markers) to rewrite")
    ap.add_argument("--collect", metavar="RUN_DIR", help="(run_benchmarks.sh) write RESULTS from a run directory")
    ap.add_argument("--commit", default="", help="with --collect: the edgelm commit measured")
    ap.add_argument("--settings", default="", help="with --collect: THREADS=.. ROUNDS=.. PP=.. TG=.. REPS=..")
    a = ap.parse_args()
    if a.collect:
        collect(a.collect, a.results, a.commit, a.settings)
        return
    with open(a.results) as f:
        res = json.load(f)
    draw(res, a.output)
    print(f"wrote {a.output}", file=sys.stderr)
    if a.doc:
        rel = os.path.relpath(os.path.abspath(a.output), os.path.dirname(os.path.abspath(a.doc)))
        update_doc(a.doc, results_markdown(res, rel))
        print(f"updated {a.doc}", file=sys.stderr)


if __name__ == "__main__":
    main()
