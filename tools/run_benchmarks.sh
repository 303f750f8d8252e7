#!/usr/bin/env bash
# Re-measure edgelm next to llama.cpp and refresh docs/benchmarks.md and its chart, in one go:
#
#   bash tools/run_benchmarks.sh
#
# 1. for each model, /work/shared/tools/sidebyside.py: interleaved rounds of `edgelm bench -o json` and
#    llama.cpp (llama-cpp-python, peer_bench.py), medians of pp/tg tokens/s and peak RSS;
# 2. `edgelm bench` on all models (-r REPS), for the llama-bench-style table with mean ± std;
# 3. everything, with the machine, goes to docs/img/benchmarks.json; tools/bench_chart.py draws
#    docs/img/benchmarks.png and rewrites the results section of docs/benchmarks.md (between its markers).
#
# Settings (environment): THREADS=2 ROUNDS=3 PP=512 TG=128 REPS=3, MODELS="a.gguf b.gguf",
# REF_PY (a Python with llama-cpp-python; default ~/.cache/edgelm-reference/venv/bin/python, made by
# /work/shared/tools/setup-reference.sh), CHART_PY (a Python with matplotlib; default python3),
# SHARED_TOOLS (where sidebyside.py and peer_bench.py live), OUT (results JSON).
# Close other work first: the machine's cores are shared, and every other busy process lowers both columns.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
THREADS="${THREADS:-2}"; ROUNDS="${ROUNDS:-3}"; PP="${PP:-512}"; TG="${TG:-128}"; REPS="${REPS:-3}"
MODELS_DIR="${EDGELM_MODELS:-$HOME/.cache/edgelm/models}"
DEFAULT_MODELS="$MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf $MODELS_DIR/gemma-3-270m-q4_k_m.gguf"
# the 1B-class model of issue 11, where tools/make_bench_model.py has made it (never committed)
[ -f "$MODELS_DIR/bench-1b-Q4_K_M.gguf" ] && DEFAULT_MODELS="$DEFAULT_MODELS $MODELS_DIR/bench-1b-Q4_K_M.gguf"
MODELS="${MODELS:-$DEFAULT_MODELS}"
REF_PY="${REF_PY:-$HOME/.cache/edgelm-reference/venv/bin/python}"
CHART_PY="$(command -v "${CHART_PY:-python3}")"   # resolved now: PATH changes below
SHARED_TOOLS="$(realpath -m "${SHARED_TOOLS:-$REPO/../shared/tools}")"
OUT="${OUT:-$REPO/docs/img/benchmarks.json}"

die() { echo "run_benchmarks: $*" >&2; exit 1; }
[ -x "$REF_PY" ] || die "no reference Python at $REF_PY (run shared/tools/setup-reference.sh)"
[ -f "$SHARED_TOOLS/sidebyside.py" ] || die "no sidebyside.py in $SHARED_TOOLS (set SHARED_TOOLS)"
"$CHART_PY" -c "import matplotlib" 2>/dev/null || die "$CHART_PY lacks matplotlib: $CHART_PY -m pip install matplotlib"
for m in $MODELS; do [ -f "$m" ] || die "missing model $m"; done

# sidebyside.py calls `edgelm` from PATH: make it the reference venv's, importing this checkout.
export PATH="$(dirname "$REF_PY"):$PATH"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
[ "$(command -v edgelm)" = "$(dirname "$REF_PY")/edgelm" ] || die "no edgelm in $(dirname "$REF_PY") (pip install -e . there)"
got="$(cd / && edgelm --version >/dev/null &&
       "$REF_PY" -c 'import edgelm, os; print(os.path.dirname(os.path.dirname(os.path.realpath(edgelm.__file__))))')"
[ "$got" = "$(realpath "$REPO")" ] || die "edgelm resolves to $got, not $REPO"
COMMIT="$(git rev-parse --short HEAD)"
if git status --porcelain --untracked-files=no | grep -q .; then COMMIT="$COMMIT + uncommitted changes"; fi

TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
cut -d' ' -f1 /proc/loadavg > "$TMP/loadavg_start" 2>/dev/null || true   # shows, afterwards, whether it was idle
# One short run first: if the kernels changed, Numba compiles them now, not inside a measured process (where
# the compiler's memory would also land in the peak RSS).
edgelm bench -m "$(echo $MODELS | tr ' ' ',')" -p 8 -n 2 -r 1 -o jsonl > /dev/null
for m in $MODELS; do
  echo "== $(basename "$m"): $ROUNDS interleaved rounds of edgelm and llama.cpp, $THREADS threads" >&2
  cmd=("$REF_PY" "$SHARED_TOOLS/sidebyside.py" "$m" --rounds "$ROUNDS" --pp "$PP" --tg "$TG" --threads "$THREADS")
  echo "${cmd[*]}" >> "$TMP/commands.txt"
  "${cmd[@]}" | tee -a "$TMP/sidebyside.jsonl" >&2
done
echo "== edgelm bench -r $REPS on all models" >&2
cmd=(edgelm bench -m "$(echo $MODELS | tr ' ' ',')" -p "$PP" -n "$TG" -t "$THREADS" -r "$REPS" -o json)
echo "${cmd[*]}" >> "$TMP/commands.txt"
"${cmd[@]}" > "$TMP/bench.json"

# The reference Python gathers the runs and the machine (with its llama-cpp-python version) into one JSON.
"$REF_PY" tools/bench_chart.py --collect "$TMP" --commit "$COMMIT" \
  --settings "THREADS=$THREADS ROUNDS=$ROUNDS PP=$PP TG=$TG REPS=$REPS" "$OUT"
"$CHART_PY" tools/bench_chart.py "$OUT" -o "$REPO/docs/img/benchmarks.png" --doc "$REPO/docs/benchmarks.md"
