#!/usr/bin/env bash
# The GPU check (issue 14 item 5), in one go on a machine with CUDA, within 8 minutes:
#
#   1. pytest:      python -m pytest -m gpu -q       (the tests marked gpu)
#   2. train_step:  benchmarks/train_step.py --device cuda --configs normal8 flex4
#                   (full training steps, flex F4 8-bit against normal 8-bit)
#   3. target:      flex F4 8-bit step <= 1.5x normal 8-bit's (from 2's JSON line)
#   4. kernels:     benchmarks/kernels.py --device cuda
#
# Run from anywhere in the repository:  bash benchmarks/gpu_check.sh
# Every figure, with the machine (nvidia-smi -L and wasearch's machine line), goes to
# $OUT/gpu_check.txt when $OUT is set, else to benchmarks/results/gpu_check.txt, and to stdout.
# Each part runs under its own `timeout`; a part that fails does not stop the others. The end
# lists every part's exit status; the script exits 1 when any failed, 2 (one line, nothing
# written) when no python here has torch with CUDA.
#
# Python: $PYTHON if set, else .venv/bin/python, else python3 / python, the first whose torch
# sees CUDA. Without the project's other dependencies there, it makes .venv-gpu (a venv that
# sees the system's torch) and installs the project into it without touching torch: its
# pure-Python dependencies and pytest (needs the package index).
set -u

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
BUDGET_S=${GPU_CHECK_BUDGET_S:-450} # all parts together, kept under 8 minutes
START=$SECONDS

has_cuda() { "$1" -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1; }

PY=""
tried=()
seen=" "
for cand in "${PYTHON:-}" "$ROOT/.venv/bin/python" python3 python; do
    [ -n "$cand" ] || continue
    path=$(command -v "$cand" 2>/dev/null) || continue
    # python and python3 of one bin folder are one environment: import torch once.
    case $seen in *" $(dirname "$path") "*) continue ;; esac
    seen="$seen$(dirname "$path") "
    tried+=("$path")
    if has_cuda "$cand"; then
        PY=$cand
        break
    fi
done
if [ -z "$PY" ]; then
    echo "gpu_check: no CUDA: no python here imports torch with torch.cuda.is_available()" \
        "(tried: ${tried[*]:-none})"
    exit 2
fi

# The benchmarks import wasearch from the checkout, not from an installed copy.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "${OUT:-}" ]; then
    REPORT="$OUT/gpu_check.txt"
else
    REPORT="$ROOT/benchmarks/results/gpu_check.txt"
fi
mkdir -p "$(dirname "$REPORT")"
: >"$REPORT"

say() { echo "$*" | tee -a "$REPORT"; }
left() { echo $((BUDGET_S - (SECONDS - START))); }

NAMES=()
CODES=()
record() {
    NAMES+=("$1")
    CODES+=("$2")
}

# run NAME CAP_S CMD...: CMD under `timeout` (CAP_S or what is left of the budget, less a
# reserve for the parts after it), its output to stdout and the report.
run() {
    local name=$1 cap=$2
    shift 2
    local t
    t=$(left)
    [ "$t" -lt "$cap" ] && cap=$t
    if [ "$cap" -lt 10 ]; then
        say "## $name: not run, the 8-minute budget is spent"
        record "$name" 124
        return
    fi
    say ""
    say "## $name (timeout ${cap}s): $*"
    timeout --kill-after=10 "$cap" "$@" 2>&1 | tee -a "$REPORT"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && say "## $name: timed out after ${cap}s"
    say "## $name: exit $rc ($((SECONDS - START)) s since start)"
    record "$name" "$rc"
}

say "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>&1 | sed 's/^/# nvidia-smi: /' | tee -a "$REPORT"
else
    say "# nvidia-smi: not installed"
fi
say "# python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1))"

# The project's dependencies next to the CUDA torch: else a venv that sees that torch.
if ! "$PY" -c 'import optuna, yaml, pytest, wasearch.latency.timing' >/dev/null 2>&1; then
    say "# $PY lacks the project's dependencies: making .venv-gpu (system site packages)"
    if [ ! -x "$ROOT/.venv-gpu/bin/python" ]; then
        timeout 60 "$PY" -m venv --system-site-packages "$ROOT/.venv-gpu" 2>&1 | tee -a "$REPORT"
    fi
    if [ -x "$ROOT/.venv-gpu/bin/python" ]; then
        run setup 120 bash -c '"$0" -m pip install -q --no-deps -e "$1" &&
            "$0" -m pip install -q "optuna>=5.0" pandas plotly pyyaml tqdm filelock pytest' \
            "$ROOT/.venv-gpu/bin/python" "$ROOT"
        has_cuda "$ROOT/.venv-gpu/bin/python" && PY="$ROOT/.venv-gpu/bin/python"
    else
        say "## setup: could not make .venv-gpu"
        record setup 1
    fi
fi

say "# machine: $("$PY" -c 'from wasearch.latency.timing import machine_line; print(machine_line("cuda"))' 2>&1)"

# 1. The tests marked gpu (pyproject.toml: "gpu: needs CUDA"). pytest exits 5 when none is
# marked: reported, not a failure.
run pytest 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider

# 2. Training steps, and 3. the target.
run train_step 180 "$PY" benchmarks/train_step.py --device cuda --configs normal8 flex4 \
    --steps 20 --warmup 3
say ""
say "## target: flex F4 8-bit training step <= 1.5x normal 8-bit's"
"$PY" - "$REPORT" <<'EOF' 2>&1 | tee -a "$REPORT"
import json, sys

lines = [x for x in open(sys.argv[1]) if x.startswith('{"benchmark": "train_step"')]
if not lines:
    sys.exit("no JSON line from train_step.py")
ratio = json.loads(lines[-1])["results"]["flex4"]["time_vs_normal8"]
print(f"flex F4 8-bit / normal 8-bit step time: {ratio:.2f}x: " + ("met" if ratio <= 1.5 else "NOT met"))
sys.exit(0 if ratio <= 1.5 else 1)
EOF
record target "${PIPESTATUS[0]}"

# 4. The deploy kernels against conv2d on the GPU.
run kernels 120 "$PY" benchmarks/kernels.py --device cuda

say ""
say "# parts (exit status): $(for i in "${!NAMES[@]}"; do printf '%s %s; ' "${NAMES[$i]}" "${CODES[$i]}"; done)"
failed=0
for i in "${!NAMES[@]}"; do
    code=${CODES[$i]}
    if [ "${NAMES[$i]}" = pytest ] && [ "$code" -eq 5 ]; then
        say "# pytest: no test is marked gpu (exit 5), not counted as a failure"
        continue
    fi
    [ "$code" -ne 0 ] && failed=1
done
say "# gpu_check: $([ $failed -eq 0 ] && echo 'every part passed' || echo 'FAILED'), $((SECONDS - START)) s; figures in $REPORT"
exit $failed
