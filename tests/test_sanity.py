"""Gradient-masking flags: each rule on hand-made results, and on real models run through the suite runner (the
trained digits ResNet, the same behind a quantizing front end with zero input gradients, and behind input noise)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from atscale.evaluation import sanity
from atscale.config import DataCfg
from atscale.data import make_loader
from atscale.evaluation.evaluator import run_suite
from atscale.evaluation.outputs import write_outputs
from atscale.evaluation.suites import suite_from_dict


def _row(acc: float, steps: int = 10, eps: float = 8.0, attack: str = "pgd", kind: str = "white-box",
         targeted: bool = False, restarts: int = 1, n: int = 1000) -> dict:
    return {"acc": acc, "n": n, "attack": attack, "kind": kind, "norm": "linf", "eps": eps, "steps": steps,
            "restarts": restarts, "targeted": targeted}


def _names(flags: list[sanity.Flag]) -> list[str]:
    return sorted(f.name for f in flags)


def test_result_rules_on_hand_made_results() -> None:
    clean = {"clean": {"acc": 0.9, "n": 1000, "kind": "clean", "attack": "clean", "eps": 0.0, "steps": 0}}
    healthy = {**clean, "pgd10": _row(0.5), "pgd100": _row(0.45, 100), "pgd100x5": _row(0.44, 100, restarts=5),
               "pgd100-eps4": _row(0.7, 100, 4.0), "unb": _row(0.0, 100, 255.0), "sq": _row(0.6, 1000, attack="square",
                                                                                       kind="black-box")}
    assert sanity.check_results(healthy) == []

    flat = {**clean, "pgd10": _row(0.5), "pgd100": _row(0.5, 100)}
    (f,) = sanity.check_results(flat)
    assert f.name == "accuracy_flat_in_steps" and f.severity == "warning" and "50.00%" in f.message
    assert sanity.check_results({**clean, "pgd10": _row(0.0), "pgd100": _row(0.0, 100)}) == []  # nothing left to fool

    rising = sanity.check_results({**clean, "pgd10": _row(0.40), "pgd100": _row(0.45, 100)})
    assert _names(rising) == ["accuracy_flat_in_steps", "accuracy_rises_with_steps"]
    assert next(f for f in rising if f.name == "accuracy_rises_with_steps").severity == "error"
    assert _names(sanity.check_results({**clean, "pgd10": _row(0.400), "pgd100": _row(0.401, 100)})) == \
        ["accuracy_flat_in_steps"]  # a rise within tolerance is not an error
    assert _names(sanity.check_results({**clean, "a": _row(0.40, 100, 4.0), "b": _row(0.40, 100, 16.0)})) == \
        ["accuracy_flat_in_eps"]
    assert _names(sanity.check_results({**clean, "a": _row(0.4, 100), "b": _row(0.4, 100, restarts=4)})) == \
        ["accuracy_flat_in_restarts"]
    assert sanity.check_results({**clean, "a": _row(0.4, 10, targeted=True), "b": _row(0.5, 100)}) == []

    (u,) = sanity.check_results({**clean, "unb": _row(0.2, 100, 255.0)})
    assert u.name == "unbounded_attack_not_zero" and u.severity == "error" and "20.00%" in u.message

    bb = {**clean, "pgd100": _row(0.5, 100), "sq": _row(0.3, 1000, attack="square", kind="black-box")}
    (b,) = sanity.check_results(bb)
    assert b.name == "black_box_stronger_than_white_box" and "30.00%" in b.message and "50.00%" in b.message
    assert sanity.check_results({**bb, "pgd100-eps16": _row(0.2, 100, 16.0)}) == []  # a stronger white-box exists
    assert sanity.check_results({**clean, "pgd100": _row(0.5, 100, targeted=True),
                                 "sq": _row(0.3, 1000, attack="square", kind="black-box")}) == []


def test_probe_rules() -> None:
    ok = {"gradients": {"n": 10, "zero_ce": 0, "nonfinite_ce": 0, "zero_margin": 0, "nonfinite_margin": 0},
          "stochastic": {"n": 10, "max_rel_diff": 0.0, "pred_changed": 0}}
    assert sanity.check_probes(ok) == []
    g = dict(ok["gradients"], zero_ce=10, zero_margin=10)
    assert _names(sanity.check_probes({**ok, "gradients": g})) == ["zero_gradients"]
    assert _names(sanity.check_probes({**ok, "gradients": dict(g, zero_margin=0)})) == ["vanishing_ce_gradients"]
    assert _names(sanity.check_probes({**ok, "gradients": dict(ok["gradients"], nonfinite_ce=1)})) == \
        ["nonfinite_gradients"]
    s = sanity.check_probes({**ok, "stochastic": {"n": 10, "max_rel_diff": 0.05, "pred_changed": 2}})
    assert _names(s) == ["stochastic_model"] and "2 of 10" in s[0].message


class Quantize(nn.Module):
    """A non-differentiable front end: 4 grey levels; torch.round has zero gradient everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 3) / 3


class InputNoise(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.05 * torch.randn_like(x)


# pgd1 (one 16/255 step) vs pgd10 (ten 4/255 steps): on the trained digits models we measured, 17-20 of 60 images
# apart, so a healthy model is never flagged flat in steps (pgd4 at 4/255 was only 2-9 images ahead)
SWEEP = {"attacks": [{"label": "pgd1", "eps": 16, "steps": 1}, {"label": "pgd10", "eps": 16, "steps": 10, "step": 4},
                     {"label": "pgd4-eps4", "eps": 4, "steps": 4},
                     {"label": "unbounded", "eps": 255, "steps": 8, "random_start": False}]}


@pytest.fixture(scope="module")
def val_loader(digits_root):
    cfg = DataCfg(root=str(digits_root), eval_batch_size=60, image_size=32, val_size=32, val_crop_ratio=1.0)
    return make_loader(digits_root, "val", cfg, torch.device("cpu"), 0, train=False)


def test_masked_stochastic_and_normal_models(trained_digits_model, val_loader, tmp_path: Path) -> None:
    model, _ = trained_digits_model
    suite = suite_from_dict(SWEEP, "sweep")
    docs = {}
    for name, m in (("normal", model), ("masked", nn.Sequential(Quantize(), model).eval()),
                    ("stochastic", nn.Sequential(InputNoise(), model).eval())):
        docs[name] = run_suite(m, val_loader, suite, max_images=60, progress=False)
    normal, masked, stoch = (docs[k] for k in ("normal", "masked", "stochastic"))

    assert normal["flags"] == [], normal["flags"]
    r = normal["results"]
    assert r["unbounded"]["acc"] == 0 and r["pgd10"]["acc"] < r["pgd1"]["acc"] < r["clean"]["acc"]
    assert normal["probes"]["gradients"]["zero_margin"] == 0 and normal["probes"]["stochastic"]["max_rel_diff"] == 0

    names = {f["name"] for f in masked["flags"]}
    assert {"zero_gradients", "accuracy_flat_in_steps", "unbounded_attack_not_zero"} <= names, masked["flags"]
    assert masked["probes"]["gradients"]["zero_margin"] == 60
    assert masked["results"]["unbounded"]["acc"] == masked["results"]["clean"]["acc"] > 0.5

    assert "stochastic_model" in {f["name"] for f in stoch["flags"]}
    assert "zero_gradients" not in {f["name"] for f in stoch["flags"]}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sanity.warn([sanity.Flag(**f) for f in masked["flags"]])
    assert all(w.category is sanity.GradientMaskingWarning for w in caught) and len(caught) == len(names)
    assert any("zero_gradients" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sanity.warn([sanity.Flag(**f) for f in normal["flags"]])

    paths = write_outputs(masked, tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert {f["name"] for f in saved["flags"]} == names
    md = paths["markdown"].read_text()
    assert "**error** `zero_gradients`" in md and "**error** `unbounded_attack_not_zero`" in md
