"""What changed between the config a checkpoint was written under and the one a resume runs with.

A resume continues the checkpoint's trajectory; keys that shape it (model, attack, objective, optimizer, schedule,
augmentation, batch, seed, precision, engine) must match or the run silently becomes another experiment. Keys that
only say where or how fast to run (logging, evaluation, loader workers, data location, perf switches, stop points)
may change freely.
"""
from __future__ import annotations

from typing import Any

from atscale.config.schema import Config

FREE_ON_RESUME: tuple[str, ...] = (
    "log.", "eval.", "perf.", "model.init_from",
    "run.resume", "run.max_steps", "run.threads", "run.device", "run.export", "run.ckpt_every_steps",
    "run.keep_last", "run.config_change", "run.out_dir", "run.name",
    "data.root", "data.src", "data.build_if_missing", "data.num_workers", "data.batches_ahead",
    "data.eval_batch_size", "dist.backend", "dist.timeout_min", "dist.bucket_cap_mb",
    "dist.gradient_as_bucket_view",
)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and dicts below a dataclass field stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not prefix:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def config_changes(old: Config, new: Config, ignore: tuple[str, ...] = FREE_ON_RESUME) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for every key that differs, except those starting with an ``ignore`` prefix."""
    a, b = flatten(old.to_dict()), flatten(new.to_dict())
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(ignore)]


def describe_changes(changes: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    """``"optim.lr 0.4 -> 0.2, schedule.epochs 15 -> 30"`` (the first ``limit``, then a count)."""
    parts = [f"{k} {a!r} -> {b!r}" for k, a, b in changes[:limit]]
    if len(changes) > limit:
        parts.append(f"and {len(changes) - limit} more")
    return ", ".join(parts)


__all__ = ["FREE_ON_RESUME", "config_changes", "describe_changes", "flatten"]
