"""The shared module walk behind Mixture BN, synchronized BN and frozen BN (atscale/layers/swap.py)."""
from __future__ import annotations

from torch import nn

from atscale.layers.swap import swap_modules


def test_replace_keep_or_look_inside() -> None:
    kept = nn.Sequential(nn.Linear(2, 2))
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 2)), kept)
    seen: list[str] = []

    def make(name: str, child: nn.Module) -> nn.Module | None:
        seen.append(name)
        if child is kept:
            return child  # kept as it is: its Linear is not visited
        return nn.Identity() if isinstance(child, nn.Linear) else None

    assert swap_modules(model, make) == 2
    assert isinstance(model[0], nn.Identity) and isinstance(model[1][1], nn.Identity)
    assert model[2] is kept and isinstance(kept[0], nn.Linear) and seen == ["0", "1", "0", "1", "2"]
