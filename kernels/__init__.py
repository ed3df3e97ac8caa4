"""Triton kernels of fusedloss (installed as fusedloss.kernels): @triton.jit code only.

The launchers that choose blocks, allocate outputs and reduce live in fusedloss/_triton.py.
"""
