#!/usr/bin/env bash
# GPU validation in one run on a bare GPU machine: build, tests, compute-sanitizer,
# benchmarks, summary. Usage and steps: benchmarks/gpu_validate/__init__.py's docstring.
#   bash benchmarks/gpu_validate.sh OUT_DIR [--dry-run] [--budget-s N] [--wheels DIR]
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_validate/__main__.py" "$@"
