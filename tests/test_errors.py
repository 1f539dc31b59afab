"""One error family: every bad config, override or command-line input ends as one line on stderr naming the problem
and the fix, with exit status 2, before any work (no run folder is created)."""
from __future__ import annotations

from pathlib import Path

import pytest

from atscale.cli import main as cli
from atscale.errors import AtscaleError, CheckpointError, ConfigError, DatasetError, ModelError, TrainingDiverged

REPO = Path(__file__).resolve().parents[1]
BAD_TRAIN = [
    (["attack.epss=8"], "unknown config key 'attack.epss'"),
    (["optim.lr=fast"], "config key 'optim.lr' = 'fast' is invalid"),
    (["attack.eps=300"], "0..255 pixel units"),
    (["log.every_steps=0"], "log.every_steps"),
    (["eval.step=-4"], "eval.step"),
    (["run.keep_last=0"], "run.keep_last"),
    (["model.bn_domains=[clean, a.b]"], "model.bn_domains"),
    (["model.bn_domains=[clean, forward]"], "nn.ModuleDict attribute"),
    (["eval.bn_domain=adv"], "eval.bn_domain"),
    (["objective.name=mbn"], "model.bn_domains: [clean, adv]"),
    (["perf.compile=default", "perf.activation_checkpointing=all"], "turn one of them off"),
    (["dist.engine=deepspeed", "run.amp=bf16", "run.device=cpu"], "needs a GPU"),
    (["eval.shift.layouts=[bogus]"], "eval.shift.layouts"),
    (["attack.eps"], "section.key=value"),
    (["--config", "nope.yaml"], "does not exist"),
    (["--bogus-flag"], "unknown option"),
]


@pytest.mark.parametrize("args, fragment", BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_bad_train_input_is_one_line_and_exit_2(args: list[str], fragment: str, tmp_path: Path, capfd) -> None:
    rc = cli(["train", "--config", str(REPO / "configs" / "demo.yaml"), f"run.out_dir={tmp_path}", *args])
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("atscale train: error: "), err
    assert fragment in lines[0], lines[0]
    assert not any(tmp_path.iterdir()), "nothing may be written before the config is valid"


def test_errors_share_one_base_that_names_the_fix() -> None:
    for cls in (ConfigError, DatasetError, CheckpointError, ModelError, TrainingDiverged):
        assert issubclass(cls, AtscaleError)
    err = ConfigError("eval.eps = 300 is out of range.\n It is a pixel budget", "give 0..255, e.g. 16")
    assert str(err) == "eval.eps = 300 is out of range. It is a pixel budget; give 0..255, e.g. 16"


def test_bad_eval_input_is_one_line_and_exit_2(trained_digits_model, digits_root, tmp_path: Path, capfd) -> None:
    """Overrides of the checkpoint's model, a 4-class dataset for a 10-class model, a truncated checkpoint."""
    _, cfg = trained_digits_model
    ckpt = cfg.run_dir / "checkpoints" / "last.pt"
    from atscale.data import build_digits

    small = tmp_path / "four"
    build_digits(small, size=32, val_fraction=0.2, seed=0)
    import json

    meta = json.loads((small / "meta.json").read_text())
    (small / "meta.json").write_text(json.dumps({**meta, "num_classes": 4, "classes": meta["classes"][:4]}))
    torn = tmp_path / "torn.pt"
    torn.write_bytes(ckpt.read_bytes()[:1000])
    cases = [([str(ckpt), "model.arch=resnet50"], "comes from the checkpoint"),
             ([str(ckpt), "--data", str(small)], "trained on 10 classes"),
             ([str(torn)], "cannot be read safely"),
             ([str(ckpt), "--step", "-4"], "eval.step"),
             ([str(ckpt), "--suite", "fd", "--eps", "8"], "fixes its budget")]
    for args, fragment in cases:
        rc = cli(["eval", *args, "--out", str(tmp_path / "out"), "--no-progress"])
        lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip() and "%|" not in ln]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("atscale eval: error: "), (args, lines)
        assert fragment in lines[0], (args, lines[0])
        assert "weights_only=False" not in lines[0] or "never load" in lines[0]
    assert not (tmp_path / "out").exists()


def test_bad_resume_checkpoints_are_one_line_and_touch_nothing(trained_digits_model, tmp_path: Path, capfd) -> None:
    """Truncated, pickled-code, missing and other-model checkpoints given to ``atscale train --resume``: exit 2, one
    line naming the fix, refused before the run folder is created."""
    import torch

    from atscale.checkpoint import CheckpointDir

    _, cfg = trained_digits_model
    ckpt = cfg.run_dir / "checkpoints" / "last.pt"
    torn, evil = tmp_path / "torn.pt", tmp_path / "evil.pt"
    torn.write_bytes(ckpt.read_bytes()[:1000])
    torch.save({"model": {}, "config": "", "evil": CheckpointDir(tmp_path)}, evil)
    demo = ["train", "--config", str(REPO / "configs" / "demo.yaml"), f"data.root={cfg.data.root}",
            f"run.out_dir={tmp_path / 'runs'}"]
    cases = [([str(torn)], "cannot be read safely"), ([str(evil)], "never load an untrusted file"),
             ([str(tmp_path / "nope.pt")], "is not a file"),
             ([str(ckpt)], "written under another config: ")]
    for args, fragment in cases:
        rc = cli([*demo, "--resume", *args])
        lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("atscale train: error: "), (args, lines)
        assert fragment in lines[0] and len(lines[0]) < 700, (args, lines[0])
        assert "retry" not in lines[0] and not (tmp_path / "runs").exists(), args
