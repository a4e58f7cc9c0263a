#!/usr/bin/env bash
# Checks that need a CUDA machine (CI has none): the CUDA-marked tests (nccl, one process per GPU,
# bf16), a few hundred steps of the demo in bf16 on CUDA in one process, the demo's instruct stage on
# every GPU with FSDP, and the training-throughput benchmark.
#
#     bash scripts/gpu_check.sh            # from the repository root, in an environment with vlmkit[dev]
#     STEPS=300 OUT=runs/gpu_check PY=python bash scripts/gpu_check.sh
set -euo pipefail

PY=${PY:-python}
OUT=${OUT:-runs/gpu_check}
STEPS=${STEPS:-300}
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 1 ]; then
    echo "gpu_check: no CUDA device visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)'))" >&2
    exit 1
fi
"$PY" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count())"

echo "== 1/4 CUDA-marked tests"
"$PY" -m pytest -q -m cuda tests

echo "== 2/4 demo: every stage for $STEPS steps, bf16, one process on CUDA"
"$PY" -m vlmkit demo --out "$OUT/demo" --set device=cuda --set precision=bf16 --set optim.steps="$STEPS" \
    --set log_every=50

echo "== 3/4 demo instruct stage: $NGPU process(es), one per GPU, strategy fsdp, bf16"
DATA="$OUT/demo/data"
"$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" -m vlmkit train --config demo --stage instruct \
    --set strategy=fsdp --set device=cuda --set precision=bf16 --set optim.steps="$STEPS" --set log_every=50 \
    --set out="$OUT/instruct_fsdp" --set tokenizer="$DATA/tokenizer" --set data.root="$DATA" \
    --set vision_from="$OUT/demo/dense"
"$PY" -m vlmkit eval "$OUT/instruct_fsdp" --data "$DATA" --split test --limit 200

echo "== 4/4 training throughput (vlmkit vs transformers' Llava)"
"$PY" bench/train_throughput.py --steps 10
