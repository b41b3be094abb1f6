#!/usr/bin/env bash
# dinokit's checks on a CUDA machine, as one prepared script (each step with its own time limit, its
# log under $OUT). Usage: bench/cuda_checks.sh STEP... with steps
#   env         GPU, driver, torch
#   inference   bench/inference.py --device cuda (dinokit vs transformers, fp32 and bf16)
#   train       bench/train_throughput.py --device cuda (dinokit vs lightly, bf16 and fp32, eager)
#   compiled    the same with torch.compile of the blocks (bf16)
#   train64     the same at batch 64 (a batch that fills the GPU, as the recipes use), 3 alternating rounds
#   pretrain    `dinokit pretrain` of ViT-S/14 (DINOv2 recipe, 224 px) on rendered shapes, then
#               continued under torchrun (NCCL) with resume=true
#   tests       the test suite's training, model and feature tests (device=auto picks the GPU)
#   embed       bench/embed.py --device cuda (seed per image, transformers batched, dinokit embed; 2048 JPEGs,
#               decoded by 8 workers); needs the CIFAR-10 archive in shared/data/ inside the checkout
#   curation    bench/curation.py section 0 (dedup and hierarchical k-means), CPU and GPU at 50k and the GPU at 400k
# Python packages that the machine lacks (lightly, faiss) can be installed from wheels in .whl/.
set -u
OUT=${OUT:-/tmp/dinokit-cuda-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    [ -d /tmp/site ] || $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T), limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name rc=$rc in $((SECONDS - start))s"
}

pretrain_check() {
    local work=/tmp/dinokit-cuda-pretrain
    rm -rf "$work"
    $PY -c "from pathlib import Path; from dinokit.demo import write_object_set; \
write_object_set(Path('$work/shapes'), 100, 32, seed=0, split='train')" || return 1
    local keys=(preset=dinov2_vits14 batch_size=32 num_workers=8 checkpoint_every=20 progress=false log_every=5
        ${PRETRAIN_KEYS:-})  # PRETRAIN_KEYS: overrides for a smoke test of this script without a GPU
    $PY -m dinokit pretrain data="$work/shapes/train" out="$work/run" max_iterations=20 "${keys[@]}" || return 1
    $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m dinokit pretrain \
        data="$work/shapes/train" out="$work/run" max_iterations=40 resume=true "${keys[@]}" || return 1
    cp "$work/run/metrics.jsonl" "$OUT/pretrain_metrics.jsonl"
    $PY - "$work/run" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1] + "/metrics.jsonl")]
for r in rows:
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
           if k in ("iteration", "loss", "dino_loss", "ibot_loss", "koleo_loss", "img_per_s", "data_wait")})
import dinokit
print("backbone loads:", type(dinokit.load_model(sys.argv[1] + "/backbone.safetensors")).__name__)
EOF
}

for name in "$@"; do
    case $name in
    env)
        step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
$PY -c 'import torch, transformers, timm; print(torch.__version__, torch.cuda.get_device_name(), \
transformers.__version__, timm.__version__)'; nproc" ;;
    inference) step inference 150 $PY bench/inference.py --device cuda --rounds 20 ;;
    train) step train 200 $PY bench/train_throughput.py --device cuda --precisions bf16,fp32 --steps 20 --warmup 5 ;;
    train64) step train64 300 $PY bench/train_throughput.py --device cuda --precisions bf16,fp32 --batch 64 --steps 10 \
        --warmup 3 --rounds 3 ;;
    compiled) step compiled 300 $PY bench/train_throughput.py --device cuda --precisions bf16 --compile --steps 20 \
        --warmup 5 ;;
    pretrain) step pretrain 200 bash "$0" _pretrain ;;
    _pretrain) pretrain_check ;;
    profile) step profile_dinokit 120 $PY bench/profile_train_step.py --device cuda --library dinokit
        step profile_lightly 120 $PY bench/profile_train_step.py --device cuda --library lightly ;;
    tests) step tests 240 $PY -m pytest -o addopts=-ra -p no:cacheprovider tests/test_cuda.py tests/test_pretrain.py \
        tests/test_vision_transformer.py tests/test_extract.py tests/test_embed.py tests/test_parity_hf.py \
        tests/test_curation_dedup.py tests/test_curation_clustering.py ;;
    embed) step embed 300 $PY bench/embed.py --device cuda --images 2048 --batch-size 128 --num-workers 8 \
        --json "$OUT/embed.json" ;;
    curation) step curation 240 bash -c "$PY bench/curation.py --speed-only --devices cpu,cuda && \
$PY bench/curation.py --speed-only --devices cuda --n 400000" ;;
    *) echo "unknown step $name" && exit 2 ;;
    esac
done
