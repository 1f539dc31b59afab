"""Pre-processing defenses in real training runs (issue 14): a fixed target under a trained pre-processor (JATP's
setting), the adversarial transformation inside the model with an exact resume, checkpoints and exports of the
defended model, and the refusals of a bad target before any training step."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from atscale.checkpoint import load_checkpoint, model_from_checkpoint
from atscale.config import load_config
from atscale.defenses import AdversarialTransform, DefendedModel
from atscale.defenses.export import load_defended
from atscale.errors import CheckpointError
from atscale.evaluation.checkpoint_eval import export_checkpoint
from atscale.train import main
from atscale.training.run import _model

from conftest import tiny_overrides

NRP = {"defense.preprocessor": "nrp", "defense.kwargs": {"channels": 8, "growth": 4, "blocks": 1}}


def _target(trained_digits_model) -> Path:
    _, cfg = trained_digits_model
    return cfg.run_dir / "checkpoints" / "last.pt"


def test_a_fixed_target_keeps_its_weights_while_the_preprocessor_trains_through_it(
        digits_root: Path, tmp_path: Path, trained_digits_model) -> None:
    target = _target(trained_digits_model)
    cfg = load_config(None, tiny_overrides(digits_root, tmp_path, "jatp_like", **NRP, **{
        "defense.train": "preprocessor", "model.init_from": str(target), "run.max_steps": 3}))
    assert main(cfg)["step"] == 3
    before = load_checkpoint(target)["model"]
    after = load_checkpoint(cfg.run_dir / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(after[k], v) for k, v in before.items())  # weights and BN statistics of the target
    model, _, _ = model_from_checkpoint(cfg.run_dir / "checkpoints" / "last.pt", torch.device("cpu"))
    assert isinstance(model, DefendedModel) and model.train_part == "preprocessor"
    fresh = {k: v for k, v in after.items() if k.startswith("preprocessor.")}
    init = _model(cfg, {"num_classes": 10}, torch.device("cpu")).preprocessor.state_dict()
    assert fresh and any(not torch.equal(v, init[k.removeprefix("preprocessor.")]) for k, v in fresh.items())

    out = export_checkpoint(cfg.run_dir / "checkpoints" / "last.pt", tmp_path / "export")
    back, x = load_defended(out), torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(back(x), model(x), atol=1e-5)

    # defense.init_from takes P from that run's checkpoint or its export; the weights arrive unchanged
    for source in (str(cfg.run_dir / "checkpoints" / "last.pt"), f"local-dir:{out}"):
        again = load_config(None, tiny_overrides(digits_root, tmp_path, "from_p", **NRP, **{
            "defense.init_from": source}))
        built = _model(again, {"num_classes": 10}, torch.device("cpu"))
        assert all(torch.equal(v, fresh[f"preprocessor.{k}"]) for k, v in built.preprocessor.state_dict().items())


@pytest.mark.parametrize("extra, match", [
    ({"model.init_from": "missing/last.pt"}, "is not a file"),
    ({"model.kwargs": {"channels": [8, 16, 32, 32]}}, "does not fit model"),
    ({"model.num_classes": 5}, "another number of classes"),
])
def test_a_bad_target_stops_before_any_step(digits_root: Path, tmp_path: Path, trained_digits_model, extra: dict,
                                            match: str) -> None:
    over = {**NRP, "defense.train": "preprocessor", "model.init_from": str(_target(trained_digits_model)), **extra}
    cfg = load_config(None, tiny_overrides(digits_root, tmp_path, "bad", **over))
    with pytest.raises(CheckpointError, match=match):
        main(cfg)
    assert not (cfg.run_dir / "checkpoints").exists() or not any((cfg.run_dir / "checkpoints").iterdir())


def test_adversarial_transformation_run_resumes_exactly_with_its_random_starts(digits_root: Path,
                                                                               tmp_path: Path) -> None:
    over = {"defense.preprocessor": "adv_transform", "defense.train": "classifier",
            "defense.base_kwargs": {"widths": [8, 16]}, "defense.iters": 3, "defense.seed": 7,
            "objective.name": "clean", "attack.name": "none", "optim.lr": 0.1}
    full = main(load_config(None, tiny_overrides(digits_root, tmp_path, "full", **over, **{"run.max_steps": 6})))
    assert full["step"] == 6
    main(load_config(None, tiny_overrides(digits_root, tmp_path, "split", **over, **{"run.max_steps": 3})))
    main(load_config(None, tiny_overrides(digits_root, tmp_path, "split", **over, **{"run.max_steps": 6,
                                                                                     "run.resume": "auto"})))
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["model"]
    assert int(a["preprocessor.calls"]) >= 6 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    cfg = load_config(None, tiny_overrides(digits_root, tmp_path, "full", **over))
    init = _model(cfg, {"num_classes": 10}, torch.device("cpu")).state_dict()
    fb = [k for k in a if k.startswith("preprocessor.base.")]
    assert fb and all(torch.equal(a[k], init[k]) for k in fb)  # f_b stays fixed (Sec 3.2)
    assert any(not torch.equal(a[k], init[k]) for k in a if k.startswith("net."))  # f_a trains on g(x)
    model, _, _ = model_from_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt", torch.device("cpu"))
    assert isinstance(model.preprocessor, AdversarialTransform) and int(model.preprocessor.calls) == int(a["preprocessor.calls"])
