"""Triton kernels of fusedloss (installed as fusedloss.kernels).

One module per loss, holding its @triton.jit kernels and, beside them, the launcher of
each op (named as the op): it takes the op's arguments by name and the outputs the op's
spec allocated, picks block sizes from the shapes, launches and returns the outputs.
Shared jit math is in _math.py, shared launch helpers in _launch.py. Imported lazily, on
the first Triton call, so that fusedloss imports where Triton does not.
"""
