"""The DAG fidelity benchmark's verdict rules (benchmarks/dag_fidelity.py): each claim follows its stated rule on hand-made
scores, and a work folder made with other settings is refused instead of reused."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import dag_fidelity as fid  # noqa: E402


def _row(seed: int, dag: float = 0.05, perm: float = 0.79, cross_train: float = 0.4, cross_net: float = 0.7,
         comb: float = 0.3, single: float = 0.6, comb_perm: float = 0.79, cross_task: float = 0.7) -> dict:
    white = {k: {"clean": 0.8, "dag": dag, "perm": perm, "p_mean": 0.002, "iters_mean": 30.0, "converged": 1.0,
                 "metric": "miou"} for k in fid.MODELS}
    combined, on_twins = {}, {}
    for name, _, _ in fid.COMBOS:
        value = comb if name == fid.full_sum() else comb_perm if name.startswith("perm") else single
        for t in fid.MODELS:
            combined[f"{t}<-{name}"] = value
            on_twins[f"{t}'<-{name}"] = value
    for t, src in (("A", "D"), ("B", "D"), ("D", "A"), ("D", "B")):
        combined[f"{t}<-r_{src}"] = cross_task
    return {"seed": seed, "white": white, "twin_clean": {k: 0.8 for k in fid.MODELS},
            "cross_train": {k: cross_train for k in fid.MODELS}, "cross_net": {"A<-B": cross_net, "B<-A": cross_net},
            "combined": combined, "on_twins": on_twins}


def _verdicts(rows: list[dict]) -> dict[str, str]:
    return {c["claim"]: c["verdict"] for c in fid.claims(rows)}


def test_the_thesis_pattern_reproduces_every_claim():
    v = _verdicts([_row(0), _row(1)])
    assert set(v.values()) == {"reproduced"} and len(v) == 3 * 3 + 2 + 3 + 4


@pytest.mark.parametrize("change, claim", [
    ({"dag": 0.3}, "1. DAG drops A"),
    ({"perm": 0.5}, "3. A: PERM drop"),
    ({"cross_train": 0.75}, "4. A: cross-training"),
    ({"comb": 0.65}, "5. A' (no source)"),
    ({"comb_perm": 0.5}, "5. D' (no source)"),
    ({"cross_task": 0.75}, "6. cross-task"),
])
def test_each_claim_fails_when_its_pattern_is_absent(change, claim):
    v = _verdicts([_row(0, **change), _row(1, **change)])
    hits = [k for k in v if k.startswith(claim)]
    assert hits and all(v[k] == "not reproduced" for k in hits)


def test_cross_training_must_win_in_every_seed():
    v = _verdicts([_row(0), _row(1, cross_train=0.72)])  # the mean still favours it; one seed does not
    assert v["4. A: cross-training transfer beats cross-network in every seed"] == "not reproduced"


def test_without_the_detector_the_sum_is_r_a_plus_r_b_and_no_cross_task_claim(monkeypatch):
    monkeypatch.setattr(fid, "MODELS", {k: fid.MODELS[k] for k in ("A", "B")})
    v = _verdicts([_row(0), _row(1)])
    assert fid.full_sum() == "r_A+r_B" and set(v.values()) == {"reproduced"} and len(v) == 2 * 3 + 2 + 2
    assert not any(k.startswith("6.") for k in v)


def test_the_tables_name_every_model_and_twin():
    text = fid.markdown([_row(0), _row(1)], fid.claims([_row(0), _row(1)]))
    assert "| r | A | B | D | A' | B' | D' |" in text and "| r_A+r_B+r_D | 30.0 | 30.0 | 30.0 | 30.0 | 30.0 | 30.0 |\n" in text


def test_a_single_r_that_beats_the_sum_on_a_twin_fails_claim_5():
    rows = [_row(0), _row(1)]
    for r in rows:
        r["on_twins"]["A'<-r_D"] = 0.2  # r_D alone beats the sum (0.3) on A'
    v = _verdicts(rows)
    assert v[next(k for k in v if k.startswith("5. A'"))] == "not reproduced"
    assert v[next(k for k in v if k.startswith("5. B'"))] == "reproduced"


def test_the_full_sum_does_not_depend_on_the_order_of_models(monkeypatch):
    monkeypatch.setattr(fid, "MODELS", {k: fid.MODELS[k] for k in ("D", "B", "A")})
    assert fid.full_sum() == "r_A+r_B+r_D" and fid.full_sum() in {c[0] for c in fid.COMBOS}


def test_a_work_folder_made_with_other_settings_is_refused(tmp_path):
    folder = tmp_path / "A0"
    folder.mkdir()
    (folder / "fidelity_settings.json").write_text(json.dumps({"overrides": ["optim.epochs=1"], "images": 64}))
    with pytest.raises(SystemExit, match="another --work"):
        fid._run(tmp_path, "A", 0, [])
