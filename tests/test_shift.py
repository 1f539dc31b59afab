"""Distribution-shift evaluation on generated JPEG folder trees (digits val images): plain / Stylized-style folders,
an ImageNet-A-style 3-of-10-class subset with restricted logits, and an ImageNet-C layout with per-corruption errors,
CE / mCE / relative mCE checked against hand computation; layout errors name the path and the fix."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from atscale.data import DatasetError
from atscale.data.sources import digits_splits
from atscale.evaluation.shift import corruption_errors, evaluate_shift, load_baseline

SUBSET = ["2", "5", "7"]


def _corrupt(img: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    if name == "gaussian_noise":
        return np.clip(img + rng.normal(0, [25, 90][severity - 1], img.shape), 0, 255).astype(np.uint8)
    f = [0.75, 0.25][severity - 1]  # contrast
    return (img * f + img.mean() * (1 - f)).astype(np.uint8)


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> Path:
    """folder/ (10 classes), subset/ (classes 2, 5, 7), c/<corruption>/<1|2>/<class>/ (2 corruptions), as JPEGs."""
    root = tmp_path_factory.mktemp("shift")
    _, val, classes = digits_splits(32, 0.2, 0)
    rng = np.random.default_rng(0)

    def save(img: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=90)

    for i in range(40):
        img, y = val[i]
        save(img, root / "folder" / classes[y] / f"{i}.jpg")
        for c in ("gaussian_noise", "contrast"):
            for s in (1, 2):
                save(_corrupt(img, c, s, rng), root / "c" / c / str(s) / classes[y] / f"{i}.jpg")
    n = 0
    for i in range(len(val)):
        img, y = val[i]
        if classes[y] in SUBSET and n < 30:
            save(img, root / "subset" / classes[y] / f"{i}.jpg")
            n += 1
    return root


def _reference(model: nn.Module, folder: Path, classes: list[str], columns: list[int] | None = None) -> tuple[int, int]:
    """(correct, n) by hand: decode each JPEG with PIL, run the model, argmax (over ``columns`` if given)."""
    files = sorted(p for p in folder.rglob("*.jpg"))
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    y = torch.tensor([classes.index(f.parent.name) for f in files])
    with torch.no_grad():
        logits = model(x.float() / 255)
    if columns is None:
        pred = logits.argmax(1)
    else:
        pred = torch.tensor(columns)[logits[:, columns].argmax(1)]
    return int((pred == y).sum()), len(files)


def _common(cfg, tmp_path: Path) -> dict:
    return dict(classes=[str(c) for c in range(10)], data_cfg=cfg.data, device=torch.device("cpu"),
                cache_dir=tmp_path / "cache", write_mode="raw", progress=False)


def test_folder_and_stylized_sets_match_hand_computation(trained_digits_model, trees: Path, tmp_path: Path) -> None:
    model, cfg = trained_digits_model
    kw = _common(cfg, tmp_path)
    correct, n = _reference(model, trees / "folder", kw["classes"])
    res = evaluate_shift(model, trees / "folder", "folder", **kw)
    assert (res["n"], res["correct"], res["n_classes"]) == (n, correct, 10) and n == 40
    assert res["acc"] == pytest.approx(correct / n) and res["acc"] > 0.5  # far above chance (0.1): images arrive intact
    betons = sorted((tmp_path / "cache").glob("*.beton"))
    assert len(betons) == 1
    stamp = betons[0].stat().st_mtime_ns
    sty = evaluate_shift(model, trees / "folder", "stylized", **kw)  # same tree: the cached .beton is reused
    assert sty["correct"] == correct and betons[0].stat().st_mtime_ns == stamp
    assert len(list((tmp_path / "cache").glob("*.beton"))) == 1


def test_imagenet_a_subset_restricts_logits_to_present_classes(trained_digits_model, trees: Path,
                                                                tmp_path: Path) -> None:
    """A model biased towards class 0 (absent from the subset) is always wrong over all logits and as good as the
    original restricted to columns 2, 5, 7."""
    model, cfg = trained_digits_model

    class Biased(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = model(x)
            return out + torch.nn.functional.one_hot(torch.tensor(0), 10).float() * 1e3

    biased = Biased().eval()
    kw = _common(cfg, tmp_path)
    cols = [2, 5, 7]
    correct, n = _reference(model, trees / "subset", kw["classes"], cols)
    assert _reference(biased, trees / "subset", kw["classes"], cols) == (correct, n)
    res = evaluate_shift(biased, trees / "subset", "imagenet-a", **kw)
    assert (res["n"], res["correct"], res["n_classes"]) == (30, correct, 3) and res["restricted_to_present_classes"]
    assert correct / n > 0.8
    plain = evaluate_shift(biased, trees / "subset", "folder", **kw)
    assert plain["correct"] == 0 and plain["notes"]


def test_imagenet_c_errors_and_mce_match_hand_computation(trained_digits_model, trees: Path, tmp_path: Path,
                                                          capfd) -> None:
    from atscale.cli import main as cli

    model, cfg = trained_digits_model
    classes = [str(c) for c in range(10)]
    baseline = {"name": "toy", "clean": 10.0, "corruptions": {"gaussian_noise": [40.0, 60.0], "contrast": 70.0,
                                                              "snow": [50, 50, 50, 50, 50]}}  # percent
    bfile = tmp_path / "baseline.yaml"
    bfile.write_text(yaml.safe_dump(baseline))
    ckpt = cfg.run_dir / "checkpoints" / "last.pt"
    out = tmp_path / "ev"
    assert cli(["eval", str(ckpt), "--shift-root", str(trees / "c"), "--shift-layout", "imagenet-c",
                "--mce-baseline", str(bfile), "--shift-write-mode", "raw", "--out", str(out), "--no-progress"]) == 0
    assert "mCE" in capfd.readouterr().out
    doc = json.loads((out / "eval.json").read_text())
    assert "results" not in doc  # shift only: no attack suite ran
    (res,) = doc["shift"]
    err = {c: {s: 1 - _reference(model, trees / "c" / c / s, classes)[0] / 40 for s in ("1", "2")}
           for c in ("contrast", "gaussian_noise")}
    assert res["errors"].keys() == err.keys()
    for c in err:
        for s in err[c]:
            assert res["errors"][c][s] == pytest.approx(err[c][s]), (c, s)
        assert res["counts"][c] == {"1": 40, "2": 40}
    assert err["contrast"]["2"] > err["contrast"]["1"]  # stronger corruption, more error
    ce_g = (err["gaussian_noise"]["1"] + err["gaussian_noise"]["2"]) / (0.40 + 0.60)
    ce_c = (err["contrast"]["1"] + err["contrast"]["2"]) / (0.70 + 0.70)
    assert res["ce"] == pytest.approx({"gaussian_noise": ce_g, "contrast": ce_c})
    assert res["mce"] == pytest.approx((ce_g + ce_c) / 2) and res["baseline"] == "toy"
    assert any("contrast" in n and "5 severities" in n for n in res["notes"])
    assert res["n"] == 160 and res["acc"] == pytest.approx(1 - sum(sum(e.values()) for e in err.values()) / 4)
    md = (out / "eval.md").read_text()
    assert "### ImageNet-C errors" in md and f"mCE {100 * res['mce']:.2f}%" in md

    # relative mCE needs the model's clean error
    rel = corruption_errors(res["errors"], load_baseline(bfile), clean_error=0.05)
    rce_g = (err["gaussian_noise"]["1"] + err["gaussian_noise"]["2"] - 2 * 0.05) / (0.40 + 0.60 - 2 * 0.10)
    assert rel["relative_ce"]["gaussian_noise"] == pytest.approx(rce_g)
    assert rel["relative_mce"] == pytest.approx((rce_g + rel["relative_ce"]["contrast"]) / 2)


def test_baselines_and_layout_errors_name_the_path_and_fix(trained_digits_model, trees: Path, tmp_path: Path,
                                                           capfd) -> None:
    from atscale.cli import main as cli

    alex = load_baseline("alexnet")
    assert len(alex["corruptions"]) == 15 and alex["corruptions"]["gaussian_noise"]["mean"] == pytest.approx(0.886428)
    assert load_baseline({"fog": [50, 60]})["corruptions"]["fog"]["severities"] == {"1": 0.5, "2": 0.6}
    assert load_baseline({"fog": 0.5})["corruptions"]["fog"]["mean"] == 0.5

    model, cfg = trained_digits_model
    kw = _common(cfg, tmp_path)
    with pytest.raises(DatasetError, match=f"'{tmp_path / 'nope'}' does not exist"):
        evaluate_shift(model, tmp_path / "nope", "folder", **kw)
    bad = tmp_path / "bad"
    (bad / "cat").mkdir(parents=True)
    (bad / "val").mkdir()
    with pytest.raises(DatasetError, match=r"not among the model's 10 training classes: \['cat', 'val'\].*"
                                           r"--shift-root"):
        evaluate_shift(model, bad, "folder", **kw)
    with pytest.raises(DatasetError, match="severities 1..5"):
        evaluate_shift(model, trees / "folder", "imagenet-c", **kw)
    empty = tmp_path / "empty" / "3"
    empty.mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        evaluate_shift(model, empty.parent, "folder", **kw)
    (empty / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="failed to decode.*broken.jpg"):
        evaluate_shift(model, empty.parent, "folder", **kw)
    with pytest.raises(DatasetError, match="mCE baseline file .* does not exist"):
        load_baseline(tmp_path / "missing.yaml")

    ckpt = cfg.run_dir / "checkpoints" / "last.pt"
    capfd.readouterr()
    assert cli(["eval", str(ckpt), "--shift-root", str(bad), "--shift-layout", "folder", "--out",
                str(tmp_path / "o")]) == 2
    assert "training classes" in capfd.readouterr().err
    assert cli(["eval", str(ckpt), "--shift-root", "a", "--shift-root", "b", "--shift-layout", "folder",
                "--shift-layout", "folder", "--shift-layout", "imagenet-c"]) == 2
    assert "one per folder" in capfd.readouterr().err
