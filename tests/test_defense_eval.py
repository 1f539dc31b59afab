"""Adaptive evaluation of pre-processing defenses (issue 14): BPDA through the pre-processor, EOT over a randomized
model, the ``defense`` suite and its gradient-masking flag, all through the one evaluator."""
from __future__ import annotations

import pytest
import torch

from atscale.attacks.adaptive import EOT, Quantize
from atscale.config import ConfigError
from atscale.defenses import AdversarialTransform, DefendedModel
from atscale.evaluation.adaptive_views import adaptive_view
from atscale.evaluation.evaluator import run_suite
from atscale.evaluation.suites import SUITES, AttackSpec, Suite
from atscale.models import create_model


def _loader(x: torch.Tensor, y: torch.Tensor, batch: int = 50):
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]


def test_bpda_breaks_a_quantizing_front_end_that_plain_pgd_cannot_and_the_flag_says_so(
        trained_digits_model, digits_val_batch) -> None:
    """Quantization has a zero gradient almost everywhere (Athalye et al. 2018, Sec 4.1): PGD through it finds
    nothing, BPDA with the identity finds what PGD on the classifier finds, and the evaluator flags the gap."""
    net, cfg = trained_digits_model
    model = DefendedModel(Quantize(8), net.net, cfg.model.mean, cfg.model.std, train="both").eval()
    x, y = digits_val_batch
    x, y = x[:100], y[:100]
    suite = Suite("t", [AttackSpec("clean", "clean"), AttackSpec("pgd10", "pgd", eps=32, steps=10, step=8),
                        AttackSpec("pgd10-bpda", "pgd", eps=32, steps=10, step=8, through="bpda")],
                  aggregates={"worst-case": ["pgd10", "pgd10-bpda"]})
    doc = run_suite(model, _loader(x, y), suite, progress=False, probes=False)
    r = doc["results"]
    assert r["pgd10-bpda"]["kind"] == "adaptive" and r["pgd10-bpda"]["through"] == "bpda"
    assert r["pgd10"]["acc"] - r["pgd10-bpda"]["acc"] > 0.2, r  # masked gradients vs a working attack
    assert r["worst-case"]["acc"] <= min(r["pgd10"]["acc"], r["pgd10-bpda"]["acc"])
    assert "adaptive_stronger_than_white_box" in {f["name"] for f in doc["flags"]}


def test_eot_view_averages_draws_of_the_adversarial_transformation() -> None:
    torch.manual_seed(0)
    fb = create_model("vgg_small", 10, [0.5] * 3, [0.5] * 3, {"widths": [8, 16]}, channels_last=False)
    net = create_model("resnet18", 10, [0.5] * 3, [0.5] * 3, {"channels": [8, 16, 32, 64]}, channels_last=False)
    model = DefendedModel(AdversarialTransform(fb, 0.2, 3, 0.2 / 6, seed=1), net.net, [0.5] * 3, [0.5] * 3,
                          train="classifier").eval()
    view = adaptive_view(model, "eot4")
    assert isinstance(view, EOT) and view.samples == 4
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        got = view(x)
        draws = [model.net(model.normalize(model.preprocessor.transform(x, call=c))) for c in range(4)]
    assert int(model.preprocessor.calls) == 4
    assert torch.allclose(got, torch.stack(draws).mean(0), atol=1e-6)
    assert adaptive_view(model, "bpda+eot2").samples == 2


def test_bad_adaptive_rows_are_refused(trained_digits_model) -> None:
    with pytest.raises(ConfigError, match="not '', 'bpda', 'bpda-smooth', 'eot<N>'"):
        AttackSpec("x", "pgd", eps=8, steps=10, through="eot")
    with pytest.raises(ConfigError, match="needs a pre-processing defense"):
        adaptive_view(trained_digits_model[0], "bpda")


def test_defense_suite_has_every_kind_of_row_and_a_worst_case_over_all() -> None:
    suite = SUITES["defense"](8.0, 2.55, False)
    rows = suite.attacks
    assert {s.kind for s in rows} == {"white-box", "adaptive", "black-box"}
    assert {s.through for s in rows} == {"", "bpda", "eot8"}
    assert suite.aggregates["worst-case"] == [s.label for s in rows] and all(s.eps == 8.0 for s in rows)
    assert {s.attack for s in rows} >= {"pgd", "apgd-dlr", "ti-fgsm", "square", "standard"}


@pytest.mark.slow
def test_defense_suite_runs_every_row_on_a_defended_model(trained_digits_model, digits_val_batch) -> None:
    net, cfg = trained_digits_model
    torch.manual_seed(0)
    model = DefendedModel(Quantize(16), net.net, cfg.model.mean, cfg.model.std).eval()
    suite = SUITES["defense"](16.0, 4.0, False)
    x, y = digits_val_batch
    doc = run_suite(model, _loader(x[:16], y[:16], 16), suite, progress=False, probes=False)
    r = doc["results"]
    assert {s.label for s in suite.specs} | {"worst-case"} == set(r)
    rows = [lab for lab in r if lab not in ("clean", "worst-case")]
    assert r["worst-case"]["acc"] <= min(r[lab]["acc"] for lab in rows)
    assert {r[lab]["kind"] for lab in rows} == {"white-box", "adaptive", "black-box"}


def test_smooth_bpda_follows_g_s_approximation_and_needs_the_transformation() -> None:
    """tanh for sign, straight-through projection (Athalye et al. Sec 4.1): as sharp as sign it is g itself; at the
    default sharpness its Jacobian, not the identity, is what the attack follows."""
    torch.manual_seed(0)
    fb = create_model("vgg_small", 10, [0.5] * 3, [0.5] * 3, {"widths": [8, 16]}, channels_last=False).eval()
    net = create_model("resnet18", 10, [0.5] * 3, [0.5] * 3, {"channels": [8, 16, 32, 64]}, channels_last=False)
    g = AdversarialTransform(fb, 0.2, 3, 0.2 / 6, seed=1)
    model = DefendedModel(g, net.net, [0.5] * 3, [0.5] * 3, train="classifier").eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(g.smooth(x, call=0, sharpness=1e6), g.transform(x, call=0), atol=1e-6)
    xs, xi = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    adaptive_view(model, "bpda-smooth")(xs).sum().backward()
    adaptive_view(model, "bpda")(xi).sum().backward()
    assert torch.isfinite(xs.grad).all() and not torch.allclose(xs.grad, xi.grad)
    nrp = DefendedModel(Quantize(4), net.net, [0.5] * 3, [0.5] * 3)
    with pytest.raises(ConfigError, match="needs the adversarial transformation"):
        adaptive_view(nrp, "bpda-smooth")
