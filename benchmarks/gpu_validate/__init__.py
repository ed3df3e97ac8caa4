"""GPU validation in one run on a bare GPU machine (project issue 13): build, test,
sanitize, benchmark, and a summary.

    bash benchmarks/gpu_validate.sh OUT_DIR [--dry-run] [--budget-s N] [--wheels DIR]

Steps, in this order; each writes its results under OUT_DIR as soon as it ends and runs
under its own time limit (its share of the budget, at most what is left once the
minimum times of the steps after it are set aside), so a hang costs one step, and a run
killed from outside still leaves every finished step's files and summary.md. The
benchmarks take whatever time is left, the large suite only if the full one ends early:

  env         nvidia-smi, torch / Triton / CUDA versions, the device         env.txt
  build       FUSEDLOSS_CUDA_ARCHS=9.0 pip install --no-build-isolation
              --no-deps -e . (stops the run if it fails)                     build.log
  peers       liger-kernel / cut-cross-entropy from the wheels folder,
              never from the network (optional)                              peers.log
  tests       the whole suite, every backend required (test_gpu.py first:
              full sizes, bf16/fp16/fp32, N*V > 2^31)                        tests.log, tests.xml
  memcheck    compute-sanitizer --tool memcheck over the CUDA ops' tests     sanitizer.log
  racecheck   compute-sanitizer --tool racecheck over the shared-memory
              kernels' tests                                                 sanitizer.log
  bench       python -m benchmarks --device cuda --suite full, one loss a
              run                                                            bench-<device>.tar.gz
  bench-large --suite large, only if the budget still allows (optional)      bench-<device>.tar.gz

OUT_DIR ends with at most 8 files (the device tool returns no more): summary.md, the
six logs above and one archive of the benchmark results (CSV/JSON/markdown/plots and the
runner's output per loss). Those names are removed from OUT_DIR at the start, so no
file is left from an earlier run.

--dry-run runs on a machine without a GPU and checks the same steps as far as that
allows: the environment is recorded, the build's tools are looked for (nothing is
built), wheels are checked with pip's --dry-run, pytest collects the GPU selections
(--collect-only), compute-sanitizer is looked for ("absent" when missing), and the
benchmark runner prints its plan (--list). Its summary marks every step dry.

Exit status: 0 when every required step passed (in a dry run: every check passed or
found its tool absent), 1 otherwise, 2 for bad arguments.
"""
# One module a step (env, build, peers, suite: the tests, selection and sanitizer: memcheck
# and racecheck, bench), each with its step_<name>(ctx, step), so that a step reads on one
# screen; common.py holds what they share, summary.py writes summary.md, driver.py runs the
# steps in order under the budget. The docstring above is the command's --help.
