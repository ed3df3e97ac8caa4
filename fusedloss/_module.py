"""The module form every loss shares: options held once, repr from them."""
import inspect

import torch

from . import _checks


class LossModule(torch.nn.Module):
    """The module form of a loss function. It holds the function's keyword options: the
    tensor ones (and `weight`, even when None, as torch's losses do) as buffers, so that
    .to() and state_dict carry them; the rest as plain attributes. Its repr shows every
    option that is not at its default."""

    BUFFERS = ("weight",)

    def __init__(self, **options):
        super().__init__()
        if "reduction" in options:
            _checks.reduction_code(options["reduction"])
        self._option_names = tuple(options)
        for name, value in options.items():
            if isinstance(value, torch.Tensor) or (value is None and name in self.BUFFERS):
                self.register_buffer(name, value)
            else:
                setattr(self, name, value)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: refuse clearly rather than fail deep inside
        # the TorchScript compiler on the Python of the forward.
        raise RuntimeError(
            f"fusedloss.{type(self).__name__} cannot be compiled by torch.jit.script: its "
            "forward is Python (argument checks, backend choice, torch.library ops) that "
            "TorchScript does not support. Use torch.compile(module) instead (fullgraph "
            "and dynamic shapes work), or torch.export.export for a graph to save.")

    def loss_options(self):
        """The options, by name, as the function takes them."""
        return {name: getattr(self, name) for name in self._option_names}

    def extra_repr(self):
        defaults = {p.name: p.default
                    for p in inspect.signature(type(self).__init__).parameters.values()}
        shown = []
        for name in self._option_names:
            value, default = getattr(self, name), defaults.get(name, inspect.Parameter.empty)
            if isinstance(value, torch.Tensor):
                shown.append(f"{name}=Tensor{list(value.shape)}")
            elif not (value is default or value == default):
                shown.append(f"{name}={value!r}")
        return ", ".join(shown)
