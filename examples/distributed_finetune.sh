#!/usr/bin/env bash
# Quantize the zoo CNN with a small hand-written policy, PGD fine-tune it in 2 processes (torchrun,
# DDP on CPU with gloo), then print its robustness report on the test split -- all from the CLI.
#
# Run: bash examples/distributed_finetune.sh [--fast]
#   --fast: 512 fine-tuning images, PGD-3 training, 100 test images, a shorter suite (for tests)
#   default: 8192 fine-tuning images, PGD-7 training, 2000 test images
# Uses the repository's .venv if there is one, else aq-brevitas / torchrun from PATH.
set -euo pipefail

if [[ "${1:-}" == "--fast" ]]; then
    train_images=512 train_steps=3 test_images=100
    eval_args=(--pgd-steps 10 --gradient-free-images 20 --suite-steps 25 --suite-queries 100)
else
    train_images=8192 train_steps=7 test_images=2000 eval_args=(--pgd-steps 20)
fi

bin="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
if [[ -x "$bin/aq-brevitas" && -x "$bin/torchrun" ]]; then
    aq="$bin/aq-brevitas" torchrun="$bin/torchrun"
elif command -v aq-brevitas >/dev/null && command -v torchrun >/dev/null; then
    aq="$(command -v aq-brevitas)" torchrun="$(command -v torchrun)"
else
    echo "error: aq-brevitas/torchrun not found in $bin or on PATH; run 'make setup' first" >&2
    exit 1
fi
export OMP_NUM_THREADS=1

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Policy JSON (schema aq-brevitas/policy/v1); layer names are the model's named_modules() names.
cat > "$work/p.json" <<'EOF'
{
  "schema": "aq-brevitas/policy/v1",
  "layers": {
    "conv1": {"weight_bit_width": 8, "scaling": "max", "granularity": "per_channel"},
    "conv2": {"weight_bit_width": 4, "scaling": "mse", "granularity": "per_channel"},
    "fc1":   {"weight_bit_width": 3, "scaling": "mse", "granularity": "per_channel"},
    "fc2":   {"weight_bit_width": 8, "scaling": "max", "granularity": "per_channel"}
  }
}
EOF

echo "== quantize (calibrated on 256 training images)"
"$aq" quantize --model cnn-pgd --policy "$work/p.json" --out "$work/q.pt" --calib-images 256

echo "== fine-tune: 2 processes, 1 epoch of PGD-$train_steps on $train_images training images"
start=$SECONDS
# torchrun runs "python -m aq_brevitas.cli" with the interpreter it was installed with.
"$torchrun" --nproc_per_node=2 --nnodes=1 --master_addr=127.0.0.1 --master_port=29531 \
    -m aq_brevitas.cli finetune --model "$work/q.pt" --out "$work/ft.pt" \
    --epochs 1 --train-steps "$train_steps" --train-images "$train_images"
echo "fine-tuning took $((SECONDS - start)) s"

echo "== evaluate on $test_images test images"
"$aq" evaluate --model "$work/ft.pt" --eps 0.1 --images "$test_images" "${eval_args[@]}"
