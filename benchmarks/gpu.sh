#!/usr/bin/env bash
# The GPU figures of README's benchmark section, on a machine with one NVIDIA GPU, from the repo root:
#
#   bash benchmarks/gpu.sh [LOGDIR]          (ONLY="name name" runs those steps alone)
#
# cuDNN attention parity (tests/test_attention.py -k cudnn), then the train step of the two GPU shapes
# (benchmarks/train_step.py: gpt2-small at seq 1024, llama-1b at seq 2048, bf16) with cuDNN attention
# against XLA's, then each against Hugging Face transformers on the same GPU (benchmarks/vs_hf.py).
set -u
logs=${1:-/tmp/t5like-gpu}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$python -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, \
'torch', torch.__version__, 'transformers', transformers.__version__, jax.devices())"

run() {  # run NAME COMMAND...: the whole log to LOGDIR/NAME.log, its last lines here
  local name=$1; shift
  [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]] || return 0
  echo "== $name: $*"
  "$@" >"$logs/$name.log" 2>&1; local status=$?
  echo "exit $status"; tail -n 4 "$logs/$name.log"; return $status
}
run cudnn_tests $python -m pytest -q -p no:cacheprovider tests/test_attention.py -k cudnn
run gpt2_small_cudnn_vs_xla $python benchmarks/train_step.py --shape gpt2-small --steps 10 \
  model.attention_impl=cudnn --vs model.attention_impl=xla
run llama_1b_cudnn $python benchmarks/train_step.py --shape llama-1b --steps 10 model.attention_impl=cudnn
run llama_1b_xla $python benchmarks/train_step.py --shape llama-1b --steps 10 model.attention_impl=xla
run gpt2_small_vs_hf $python benchmarks/vs_hf.py --shape gpt2-small --rounds 10 model.attention_impl=cudnn
# HF at batch 8 may not fit 80 GB (eager, no gradient checkpointing); then both sides at batch 4.
run llama_1b_vs_hf $python benchmarks/vs_hf.py --shape llama-1b --rounds 10 model.attention_impl=cudnn ||
  run llama_1b_b4_vs_hf $python benchmarks/vs_hf.py --shape llama-1b --rounds 10 model.attention_impl=cudnn \
    train.batch_size=4
