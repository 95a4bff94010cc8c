#!/usr/bin/env bash
# The README's first command: set up the environment, then train the CPU-sized HAR-Net
# (configs/HARNet/demo/har_R18_shapes_demo.yaml) from scratch on the built-in shapes
# dataset, evaluate it with Detectron2's COCOEvaluator, evaluate the untrained model the
# same way for comparison, print the COCO and per-class AP tables, and draw one PNG per
# validation image: the ground truth beside the detections, the attention masks below.
#
#   tools/run_demo.sh                         # outputs in output/demo
#   HARNET_DEMO_OUTPUT=/tmp/demo tools/run_demo.sh SOLVER.MAX_ITER 100   # extra overrides
#
# Training is 2200 iterations (0.239 s/iter on 2 idle cores of an Intel Xeon, 0.17-0.19 on
# 2 idle cores of an AMD EPYC Zen 1; README "Demo" gives the whole script's time on each);
# a machine loaded by other processes takes longer. `python dev/benchmark_demo.py` prints
# this machine's s/iter and the whole demo's expected time. It runs on CUDA when torch
# sees a GPU (printed first); "tools/run_demo.sh MODEL.DEVICE cpu" forces the CPU.
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then  # the comment above is the usage
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
  exit 0
fi
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
PY="${HARNET_VENV:-$ROOT/.venv}/bin/python"
CFG="configs/HARNet/demo/har_R18_shapes_demo.yaml"
OUT="${HARNET_DEMO_OUTPUT:-$ROOT/output/demo}"
# OpenMP's wait policy, unless the caller set one: threads that spin between kernels
# (the default) train ~1.8x faster on idle cores (0.21 against 0.38 s/iter, benchmark of
# this config on 2 idle cores), but several-fold slower when other processes compete for
# the cores (3.4 against 0.7 s/iter measured under load). So: passive only on a busy
# machine, judged by the share of CPU time other processes used over one second.
if [[ -z "${OMP_WAIT_POLICY:-}" ]]; then
  read -r _ u1 n1 s1 i1 w1 _ < /proc/stat; sleep 1; read -r _ u2 n2 s2 i2 w2 _ < /proc/stat
  busy=$(( 100 - 100 * (i2 + w2 - i1 - w1) / (u2 + n2 + s2 + i2 + w2 - u1 - n1 - s1 - i1 - w1 + 1) ))
  if (( busy >= 25 )); then
    export OMP_WAIT_POLICY=PASSIVE
    echo "[demo] the CPU is ${busy}% busy with other work: OMP_WAIT_POLICY=PASSIVE"
  else
    echo "[demo] the CPU is ${busy}% busy: OpenMP threads spin (OMP_WAIT_POLICY unset)"
  fi
fi
cd "$ROOT"
start=$(date +%s)
# The device: CUDA when torch sees a GPU, else the CPU; "MODEL.DEVICE cpu" forces the CPU
# (the config names no device; train_net.py falls back to the CPU without CUDA).
"$PY" - "$@" <<'PY'
import os, sys, torch
args = sys.argv[1:]
dev = args[args.index("MODEL.DEVICE") + 1] if "MODEL.DEVICE" in args[:-1] else "cuda"
if dev.startswith("cuda") and torch.cuda.is_available():
    print(f"[demo] device: {dev} ({torch.cuda.get_device_name(torch.device(dev))})")
else:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "CPU") if os.path.exists("/proc/cpuinfo") else "CPU"
    why = "MODEL.DEVICE " + dev if not dev.startswith("cuda") else "no CUDA GPU found"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"[demo] device: cpu ({cpu}, {cores} cores; {why})")
PY

echo "[demo] 1/3 train + evaluate HAR-Net (R-18, from scratch) -> $OUT"
"$PY" train_net.py --config-file "$CFG" OUTPUT_DIR "$OUT" "$@"

echo "[demo] 2/3 evaluate the untrained model (same config, random weights; every"
echo "       candidate kept: untrained scores are all below the usual 0.05 threshold)"
"$PY" train_net.py --eval-only --config-file "$CFG" OUTPUT_DIR "$OUT/untrained" \
  "$@" MODEL.WEIGHTS "" MODEL.RETINANET.SCORE_THRESH_TEST 0.0

echo "[demo] 3/3 pictures (ground truth | detections, attention masks below) -> $OUT/vis"
"$PY" tools/visualize.py --config-file "$CFG" --dataset harnet_shapes_val --max-images 6 \
  --output "$OUT/vis" "$@" MODEL.WEIGHTS "$OUT/model_final.pth"

"$PY" - "$OUT" "$(( $(date +%s) - start ))" <<'PY'
import os, sys
out, seconds = sys.argv[1], int(sys.argv[2])
def last_ap(log):
    lines = [l for l in open(log) if "copypaste: " in l]
    names = lines[-2].split("copypaste: ")[1].strip().split(",")
    values = lines[-1].split("copypaste: ")[1].strip().split(",")
    return dict(zip(names, values))
trained, untrained = last_ap(os.path.join(out, "log.txt")), last_ap(os.path.join(out, "untrained", "log.txt"))
keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
print("\n[demo] harnet_shapes_val, COCO bbox AP (%):")
print("  model      " + "".join(f"{k:>8}" for k in keys))
for name, r in (("untrained", untrained), ("trained", trained)):
    print(f"  {name:<10} " + "".join(f"{float(r[k]):8.2f}" for k in keys))
def per_class(log):
    # The last "Per-category bbox AP" table COCOEvaluator logged: "| name | AP | name | AP |".
    lines = open(log).read().splitlines()
    start = max((i for i, l in enumerate(lines) if "Per-category bbox AP" in l), default=None)
    if start is None:
        return {}
    cells = []
    for l in lines[start + 3:]:
        if not l.startswith("|"):
            break
        cells += [c.strip() for c in l.strip().strip("|").split("|")]
    return {n: float(v) for n, v in zip(cells[0::2], cells[1::2]) if n}
cls_trained = per_class(os.path.join(out, "log.txt"))
cls_untrained = per_class(os.path.join(out, "untrained", "log.txt"))
if cls_trained:
    names = list(cls_trained)
    width = max(8, max(len(n) for n in names) + 1)
    print("\n[demo] per-class bbox AP (%):")
    print("  model      " + "".join(f"{n:>{width}}" for n in names))
    for name, r in (("untrained", cls_untrained), ("trained", cls_trained)):
        if r:
            print(f"  {name:<10} " + "".join(f"{float(r.get(n, float('nan'))):{width}.2f}" for n in names))
print(f"[demo] total wall time {seconds // 60} min {seconds % 60} s; pictures in {os.path.join(out, 'vis')}")
PY
