#!/usr/bin/env bash
# One call on the GPU machine: build the native reader, check, and measure, stage by stage.
#   bash tools/device_run.sh [STAGE ...]      (default: build models kernels io b32 b96 nvme)
# Stages: build models kernels io gputest b32 b32w b32t b96 b96w b96wt b96m nvme ttft q30 q30e q30kv p30 p30b
#   p30r p30kv p30kvc p30c p30p3 p30cp p30old copyc hattn hattns hattns8 hthreads hlayout pspread hattnab hattnfp hattnq hread profh profhp
#   profht profp prof profb96 pgemm h2dk h2ds pelem gpuhkv refill mgputest mgpu (see docs/benchmarks.md).
# Every stage's output goes to $OUT/all.log; JSON results to $OUT/*.json; a table comes last.
set -u
# NVLink multicast stays off (the device library's KINDS.md): NCCL, PyTorch and NVSHMEM
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/zeroinf-out}
mkdir -p "$OUT"
LOG=$OUT/all.log
NVME=${NVME_DIR:-/tmp/zeroinf-nvme}
# issue 7: OPT-30B fp16, the whole 24 GiB budget, the planner's plan (the p30* stages)
P30=(--model opt-30b --offload cpu --gpu-memory 24GiB --batch-size auto --prompt-len 512 --gen-len 32)
# issue 7: OPT-13B fp16, a 12 GiB *weight* budget, batch 96 as 3 x 32 (the b96w* stages)
B96W=(--model opt-13b --offload cpu --gpu-memory 13.75GiB --batch-size 96 --micro-batch 32 --prompt-len 512 --gen-len 32)
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build models kernels io b32 b96 nvme)
: >"$OUT/summary.txt"

run() {  # run NAME TIMEOUT CMD...
  local name=$1 t=$2
  shift 2
  echo "===== $name: $* ($(date -u +%FT%TZ))" >>"$LOG"
  local start=$SECONDS
  timeout "$t" "$@" >>"$LOG" 2>&1
  local rc=$?
  printf '%-10s rc=%-3s %4ss\n' "$name" "$rc" "$((SECONDS - start))" >>"$OUT/summary.txt"
}

bench() {  # bench NAME TIMEOUT ARGS...
  local name=$1 t=$2
  shift 2
  run "$name" "$t" python -m zeroinf.cli.bench --json "$OUT/$name.json" "$@"
}

for s in "${STAGES[@]}"; do
  case $s in
    build) run build 120 bash -c "nvidia-smi; python -c 'import torch, triton, transformers; \
print(torch.__version__, triton.__version__, transformers.__version__)'; \
python setup.py build_ext --inplace" ;;
    models) run models 300 python tools/check_models_gpu.py ;;
    kernels) run kernels 300 python tools/bench_kernels.py --json "$OUT/kernels.json" ;;
    io) run io 400 python tools/bench_io.py --dir "$NVME/io" --json "$OUT/io.json" ;;
    gputest) run gputest 300 python -m pytest -q -m gpu tests/engine tests/models tests/io ;;
    b32) bench b32 300 --trace --model opt-13b --offload cpu --gpu-memory 12GiB --batch-size 32 \
      --prompt-len 512 --gen-len 32 ;;
    # b32 with 12 GiB of weights resident, as the peers count a "12 GiB" run (FlexGen: 11.8 GiB
    # resident); the streaming slots and the activation workspace come on top (13.75 GiB in all)
    b32w) bench b32w 300 --trace --model opt-13b --offload cpu --gpu-memory 13.75GiB --batch-size 32 \
      --prompt-len 512 --gen-len 32 ;;
    b96w) bench b96w 400 "${B96W[@]}" ;;
    b96wt) bench b96wt 400 --trace "${B96W[@]}" ;;  # b96w with the copy timeline
    b96) bench b96 400 --model opt-13b --offload cpu --gpu-memory 12GiB --batch-size 96 \
      --prompt-len 512 --gen-len 32 ;;
    b32t) run b32t 300 env ZEROINF_COPY_THREAD=1 python -m zeroinf.cli.bench --json "$OUT/b32t.json" \
      --trace --model opt-13b --offload cpu --gpu-memory 12GiB --batch-size 32 --prompt-len 512 \
      --gen-len 32 ;;
    nvme) bench nvme 500 --model llama-2-7b --offload nvme --nvme-dir "$NVME" \
      --gpu-memory 8GiB --batch-size 8 --prompt-len 128 --gen-len 4 ;;
    ttft) run ttft-write 200 python -c "import torch; from zeroinf.cli.bench import write_shape; \
print(write_shape('llama-2-7b', torch.float16, '$NVME'))"
      bench ttft 300 --path "$NVME/llama-2-7b-float16" --offload cpu --gpu-memory 8GiB \
        --batch-size 8 --prompt-len 128 --gen-len 2 ;;
    q30) bench q30 400 --trace --model opt-30b --quantize int4 --quantize-head --offload cpu \
      --gpu-memory 1.76GiB --prefill-tokens 1024 --batch-size 32 --prompt-len 512 --gen-len 32 ;;
    q30kv) bench q30kv 400 --trace --model opt-30b --quantize int4 --quantize-head --kv-dtype int8 \
      --offload cpu --gpu-memory 12.5GiB --prefill-tokens 2048 --batch-size 32 --prompt-len 512 \
      --gen-len 32 ;;
    q30e) run q30e 400 env ZEROINF_CUDA_GRAPHS=0 python -m zeroinf.cli.bench --json "$OUT/q30e.json" \
      --model opt-30b --quantize int4 --quantize-head --offload cpu --gpu-memory 1.76GiB \
      --prefill-tokens 1024 --batch-size 32 --prompt-len 512 --gen-len 32 ;;
    profh) run profh 400 env PYTHONPATH=. python tools/profile_bench.py --cpu --top 40 \
      --trace "$OUT/profh-trace.json" -- --model opt-30b --offload cpu --gpu-memory 24GiB \
      --batch-size auto --kv-tier cpu --prompt-len 512 --gen-len 8 ;;  # host KV tier, host side
    profhp) run profhp 400 env PYTHONPATH=. python tools/profile_bench.py --top 25 -- --model opt-30b \
      --offload cpu --gpu-memory 24GiB --batch-size auto --kv-tier cpu --prompt-len 512 \
      --gen-len 2 ;;  # host KV tier: the device's kernels in the prefill
    profht) run profht 400 env PYTHONPATH=. python tools/profile_bench.py --top 10 \
      --trace "$OUT/profht.json" -- "${P30[@]}" --kv-tier cpu --gen-len 4 \
      && gzip -f "$OUT/profht.json" ;;  # host KV tier: a GPU timeline of 3 decode steps
    gpuhkv) run gpuhkv 300 python tools/bench_gpu_reads_host_kv.py --json "$OUT/gpuhkv.json" ;;
    pelem) run pelem 200 python tools/bench_prefill_elementwise.py --json "$OUT/pelem.json" ;;  # issue 7
    h2dk) run h2dk 200 python tools/bench_h2d_beside_kernels.py --json "$OUT/h2dk.json" ;;  # b96w's copies
    h2ds) run h2ds 200 python tools/bench_h2d_streams.py --json "$OUT/h2ds.json" ;;  # a unit over 1-4 streams
    profb96) run profb96 300 env PYTHONPATH=. python tools/profile_bench.py --top 25 -- \
      "${B96W[@]}" --gen-len 2 ;;  # b96w's prefill: the device's kernels
    pgemm) run pgemm 200 python tools/bench_prefill_gemm.py --json "$OUT/pgemm.json" ;;  # issue 7
    hattn) run hattn 300 python tools/bench_host_attention.py --json "$OUT/hattn.json" ;;  # issue 7
    hattns) run hattns 200 python tools/bench_host_attention.py --sweep --json "$OUT/hattns.json" ;;
    # who holds the cores while the kernel runs beside H2D: direct / queued, by thread count,
    # the driver's default waits and blocking ones
    hthreads) run hthreads 200 python tools/bench_host_threads.py --json "$OUT/hthreads.json"
      run hthreadsb 200 python tools/bench_host_threads.py --blocking-sync \
        --json "$OUT/hthreadsb.json" ;;
    # the kernel and torch's sum over separate / interleaved k, v, 6 GB and 48 GB, beside H2D
    # from one 256 MiB buffer and from 16 in turn
    hlayout) run hlayout 400 python tools/bench_host_layout.py --json "$OUT/hlayout.json" ;;
    # the probe's CPU attention figures measured again and again (its windows and 3 s ones)
    pspread) run pspread 300 python tools/bench_probe_spread.py --json "$OUT/pspread.json" ;;
    hattns8) run hattns8 200 python tools/bench_host_attention.py --sweep --kv-dtype int8 \
      --json "$OUT/hattns8.json" ;;  # the same over an int8 cache
    # the kernel against the one at build/baseline/host_attn.c (copy it there and carry build/baseline)
    hattnab) run hattnab 300 bash -c 'set -e; b=build/baseline; gcc -O3 -Wall -std=gnu11 -pthread \
      -shared -fPIC $(python3-config --includes) $b/host_attn.c -o $b/_native_attn.so -ldl; \
      python tools/bench_host_attention.py --sweep --baseline $b/_native_attn.so \
      --json "$0/hattnab.json"' "$OUT" ;;
    # does a small H2D copy wait behind a streamed unit's? (the host tier's gap: benchmarks.md)
    copyc) run copyc 200 env PYTHONPATH=. python tools/bench_copy_contention.py --json "$OUT/copyc.json" ;;
    # p30 in another version of the tree, for an A/B in one call: git archive REV | tar -x -C
    # build/ab_old, and carry build/ab_old
    p30old) run p30old 500 bash -c 'cd build/ab_old && python setup.py build_ext --inplace -q && \
      python -m zeroinf.cli.bench --json "$0/p30old.json" "$@"' "$OUT" "${P30[@]}" ;;
    # (a variable before a function call is in its commands' environment for that call only)
    p30cp) ZEROINF_HOST_OUT=copy bench p30cp 500 --trace "${P30[@]}" ;;  # outputs by the copy engine (A/B)
    hattnfp) run hattnfp 300 python tools/bench_host_attention.py --footprint --json "$OUT/hattnfp.json" ;;
    hread) run hread 200 env PYTHONPATH=. python tools/bench_host_read.py --json "$OUT/hread.json" ;;  # the probe's reader
    hattnq) run hattnq 200 python tools/bench_host_attention.py --quick --json "$OUT/hattnq.json" ;;
    refill) run refill 570 python tools/bench_refill.py --json "$OUT/refill.json" ;;  # issue 9, ~6.5 min
    p30) bench p30 500 "${P30[@]}" ;;
    p30b) bench p30b 500 "${P30[@]}" ;;  # p30 again in the same call (its own JSON)
    p30r) bench p30r 560 "${P30[@]}" --repeat 4 ;;  # p30, then 3 more calls on the same cache
    p30p3) bench p30p3 500 --trace "${P30[@]}" --prefetch 3 ;;  # the planner may take a third slot
    p30kv) bench p30kv 500 "${P30[@]}" --kv-dtype int8 ;;
    p30kvc) bench p30kvc 500 "${P30[@]}" --kv-dtype int8 --kv-tier cpu ;;  # int8 in host memory
    p30c) bench p30c 500 "${P30[@]}" --kv-tier cpu ;;  # issue 7: KV cache in host memory
    b96m) bench b96m 400 --model opt-13b --offload cpu --gpu-memory 12GiB --batch-size 96 \
      --micro-batch 32 --prompt-len 512 --gen-len 32 ;;
    profp) run profp 300 env PYTHONPATH=. python tools/profile_bench.py --top 30 -- --model opt-13b \
      --offload cpu --gpu-memory 13.75GiB --batch-size 32 --prompt-len 512 --gen-len 2 ;;  # fp16 prefill
    prof) run prof 300 env PYTHONPATH=. python tools/profile_bench.py --top 40 -- --model opt-30b --quantize int4 \
      --quantize-head --kv-dtype int8 --offload cpu --gpu-memory 12GiB --prefill-tokens 2048 \
      --batch-size 32 --prompt-len 512 --gen-len 2 ;;
    # issue 11 (a multi-GPU kind): 2 GPU ranks over NCCL with unequal prompts against one process
    mgputest) run mgputest 300 python -m pytest -q -m gpu tests/distributed ;;
    # issue 11: per-GPU throughput for N ranks, N = MGPU_RANKS (default: 1 up to every GPU)
    mgpu) for n in ${MGPU_RANKS:-$(seq 1 "$(nvidia-smi -L | wc -l)")}; do
        run "mgpu$n" 500 torchrun --nproc-per-node "$n" -m zeroinf.cli.bench --trace \
          --json "$OUT/mgpu$n.json" --model opt-30b --offload cpu --gpu-memory 12GiB \
          --batch-size 32 --prompt-len 512 --gen-len 32
      done ;;
    *) echo "unknown stage $s" >>"$OUT/summary.txt" ;;
  esac
done

grep -E "^(zeroinf plan|  (device|resident|streamed|predicted|measured|prefill|decode|total|ratio))|tok/s|GB/s|time total|PASS|FAIL|rel err|Error|error" "$LOG" | tail -n 80
echo "----- stages"
cat "$OUT/summary.txt"
