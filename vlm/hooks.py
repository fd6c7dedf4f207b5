"""Forward hooks installed by a context manager that always removes them (even on error).

An intervention is a small function of a module's output tensor: it returns the tensor to use instead,
or None to leave the output as it is. Decoder layers may return a tensor or a tuple whose first element
is the residual stream; `hidden_of` / `with_hidden` hide that difference.
"""

from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

Edit = Callable[[torch.Tensor], torch.Tensor | None]


def hidden_of(output) -> torch.Tensor:
    """The tensor a module produced: the output itself, or the first element of a tuple output."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output, hidden: torch.Tensor):
    """`output` with its tensor replaced by `hidden`, keeping the tuple structure when there is one."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@dataclass
class Hook:
    """Run `edit` on `module`'s output tensor (forward hook)."""

    module: torch.nn.Module
    edit: Edit

    def register(self):
        def forward_hook(_module, _args, output):
            new = self.edit(hidden_of(output))
            return None if new is None else with_hidden(output, new)

        return self.module.register_forward_hook(forward_hook)


@contextmanager
def hooks(*installed: Hook):
    """Install every hook for the duration of the block; remove them all on exit, error or not."""
    handles = []
    try:
        for hook in installed:
            handles.append(hook.register())
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture(modules: Mapping[str, torch.nn.Module]):
    """Record each module's output tensor (detached) under its name while the block runs.

    Yields the dict that fills as the forward pass runs: {name: tensor}; a module called twice keeps its
    last output."""
    cache: dict[str, torch.Tensor] = {}

    def recorder(name):
        def edit(tensor):
            cache[name] = tensor.detach()
            return None

        return edit

    with hooks(*(Hook(module, recorder(name)) for name, module in modules.items())):
        yield cache
