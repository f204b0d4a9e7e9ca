#!/usr/bin/env bash
# GPU check (issue 20, item 5): in under 8 minutes on one GPU (sized for an H200),
#   1. the CUDA subset of the tests (every test marked skipif(not torch.cuda.is_available())),
#   2. lorakit LoRA / QLoRA vs peft (+ bitsandbytes' CUDA kernels) training steps on a Llama of
#      TinyLlama-1.1B's shapes built from a config (random weights, nothing downloaded), bfloat16,
#      batch 8 x 1024: tokens/s and peak CUDA memory (max_memory_allocated),
#   3. NF4 dequantize throughput, lorakit vs bitsandbytes;
# then one table on stdout, the same as JSON in OUT.json (default bench/gpu_check.json), and as the
# last stdout line one JSON object of ratios (lorakit / peft). Details: bench/gpu_check.py's docstring.
#
# Needs: python3 with PyTorch (a CUDA build), transformers and pytest; peft and bitsandbytes are
# optional (a contender whose library is missing is reported as 'not installed', not a failure).
# Installs nothing and reaches no network (HF_HUB_OFFLINE=1). lorakit comes from src/ (PYTHONPATH).
# Python: $PYTHON if set, else .venv/bin/python if there, else python3.
#
# How the lead runs it, from the repository root:
#     PYTHONPATH=src bash bench/gpu_check.sh [OUT.json] [--reps 10] [--skip-tests]
# and on the device machine (the run tool): command "PYTHONPATH=src bash bench/gpu_check.sh", timeout_s 540;
# its image has no bitsandbytes: bench/README.md (GPU check) says how to carry it there as a wheel.
# Without a CUDA device it says so, runs a dry run on the CPU (a shrunken model, one step of each
# contender, the table and JSON; default OUT bench/gpu_check.dry_run.json) and exits 0.
# Exit status: 0 when everything that ran passed, 1 when a CUDA test or an installed contender failed,
# 124 when the 8-minute limit cut it short.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
exec timeout 480 "$py" bench/gpu_check.py "$@"
