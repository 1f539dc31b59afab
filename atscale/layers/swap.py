"""One walk for the module swaps of atscale (Mixture BN, synchronized BN, frozen BN): replace children in place."""
from __future__ import annotations

from typing import Callable

from torch import nn

Swap = Callable[[str, nn.Module], "nn.Module | None"]


def swap_modules(module: nn.Module, make: Swap) -> int:
    """Walks ``module``'s children depth-first: ``make(name, child)`` returns a replacement, the child itself to keep
    it as it is (its own children untouched), or None to look inside it. Returns how many children were replaced."""
    count = 0
    for name, child in module.named_children():
        new = make(name, child)
        if new is None:
            count += swap_modules(child, make)
        elif new is not child:
            setattr(module, name, new)
            count += 1
    return count


__all__ = ["swap_modules"]
