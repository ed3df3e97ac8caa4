"""The fusedloss benchmark runner: `fusedloss-bench` or `python -m benchmarks`.

Modules: cases (what is measured), providers (who is measured), measure (how: timing,
peak memory, one worker process per case), report (files, table, plots). The columns
are explained in benchmarks/README.md.
"""
