"""The fusedloss benchmark runner: `fusedloss-bench` or `python -m benchmarks`.

Its modules import only downwards, in these layers (tests/test_benchmarks.py checks that
the graph, function-level imports included, has no circle):

  measure, llama      how a step is timed and its peak memory taken, one worker process
                      per case; the small Llama of the end-to-end case
  cases, distributed, what is measured (the suites); the world > 1 cases on gloo ranks;
  progress            the progress bar and its estimate of the time left
  providers           who is measured (fusedloss's backends, eager torch, torch.compile, peers)
  report              files, table and plots
  __main__, e2e       the commands: the runner, and the Llama training step alone

gpu_validate/ (the one-command GPU run) stands apart: it runs the runner as a command.
So do the examples and tools, which import fusedloss only: distributed_example.py and
fsdp_tp_example.py (torchrun scripts), torchtitan_loss.py (a loss for torchtitan's
trainer), transformers_coverage.py (the README's table of transformers classes).
The columns are explained in benchmarks/README.md.
"""
