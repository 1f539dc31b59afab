"""The defense fidelity benchmark's bookkeeping (issue 14): which runs a resumed seed still needs, and claims judged
against the noise of the measured accuracies, never by a bare comparison of means."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import defense_fidelity as fid  # noqa: E402


def test_a_resumed_seed_trains_only_missing_runs_and_what_they_need() -> None:
    skip = ("ARN", fid.TRANSFORMS[2])
    done = [{"label": lab, "seed": 0} for lab in fid.RUNS if not lab.startswith("f_b ") and lab not in skip]
    assert fid.to_train(done, 0) == ["target (TRADES)", "ARN", "f_b adv", fid.TRANSFORMS[2]]
    assert fid.to_train(done, 1)[0] == "target (TRADES)" and len(fid.to_train(done, 1)) == len(fid.RUNS)


def test_claims_count_only_differences_beyond_two_standard_errors() -> None:
    assert fid.rises([0.40, 0.46], 718) == "reproduced"  # +6 points, SE 2.6
    assert fid.rises([0.40, 0.42], 718) == "within noise"
    assert fid.rises([0.50, 0.30], 359) == "not reproduced"
    assert fid.rises([0.10, 0.30, 0.31], 718) == "within noise"  # every step must clear the noise
    rows = [{"label": "target (TRADES)", "seed": s, "worst": 0.40, "pgd20": 0.40, "n": 359} for s in (0, 1)] + \
           [{"label": "HGD", "seed": s, "worst": 0.05, "pgd20": 0.30, "n": 359} for s in (0, 1)] + \
           [{"label": "NRP static", "seed": 0, "worst": 0.38, "pgd20": 0.38, "n": 359}]
    verdicts = {c["claim"].split(" (")[0]: c["verdict"] for c in fid.claims(rows)}
    assert verdicts["1. HGD"] == "reproduced" and verdicts["1. NRP static"] == "within noise"
    assert fid.images(rows, "NRP static", "target (TRADES)") == 359  # one seed of NRP static
