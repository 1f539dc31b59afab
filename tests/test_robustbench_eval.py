"""RobustBench-exact evaluation: val JPEGs pre-processed as RobustBench does (robustbench/data.py PREPROCESSINGS), its
image-list subset, and RobustBench's model info beside the export. References are torchvision's own ImageFolder and
transforms, computed here independently of atscale."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from torchvision import datasets
from torchvision import transforms as T

from atscale.data.jpeg_eval import list_samples, make_jpeg_loader
from atscale.errors import DatasetError

SIZES = [(300, 260), (260, 300), (411, 257), (320, 240)]  # non-square, all crossing 256 differently
REFERENCE = {
    "BicubicRes256Crop224": lambda: T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
                                               T.CenterCrop(224), T.ToTensor()]),
    "Res256Crop224": lambda: T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()]),
    "Res224": lambda: T.Compose([T.Resize([224, 224]), T.ToTensor()]),
    "Crop288": lambda: T.Compose([T.CenterCrop(288), T.ToTensor()]),
}
CLASSES = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory) -> Path:
    """Two real digits val images per class, upscaled to non-square sizes and saved as JPEG in ImageFolder layout."""
    from atscale.data.sources import digits_splits

    _, val, classes = digits_splits(32, 0.2, 0)
    root = tmp_path_factory.mktemp("jpegs") / "val"
    count = dict.fromkeys(range(10), 0)
    for i in range(len(val)):
        img, y = val[i]
        if count[y] == 2:
            continue
        size = SIZES[(2 * y + count[y]) % len(SIZES)]
        (root / classes[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).resize(size, Image.BILINEAR).save(root / classes[y] / f"img{i:04d}.JPEG", quality=90)
        count[y] += 1
    return root


def _reference(root: Path, preprocess: str) -> tuple[torch.Tensor, torch.Tensor]:
    ds = datasets.ImageFolder(str(root), transform=REFERENCE[preprocess]())
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    return torch.stack(xs), torch.tensor(ys)


@pytest.mark.parametrize("preprocess", list(REFERENCE))
def test_jpeg_batches_equal_torchvision_bit_for_bit(jpeg_root: Path, preprocess: str) -> None:
    loader = make_jpeg_loader(jpeg_root, CLASSES, preprocess, torch.device("cpu"), batch_size=8)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [8, 8, 4]
    assert all(x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last) for x, _ in batches)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    want_x, want_y = _reference(jpeg_root, preprocess)
    assert torch.equal(x, want_x) and torch.equal(y, want_y) and loader.skipped == []
    if preprocess == "BicubicRes256Crop224":  # the interpolation matters: bilinear gives other pixels
        assert not torch.equal(x, _reference(jpeg_root, "Res256Crop224")[0])


def _clean_suite(tmp_path: Path) -> Path:
    spec = tmp_path / "cleanonly.yaml"
    spec.write_text(yaml.safe_dump({"attacks": [{"label": "clean", "attack": "clean"}]}))
    return spec


def test_eval_feeds_robustbench_images_and_export_reports_them(trained_digits_model, jpeg_root: Path,
                                                               tmp_path: Path) -> None:
    """The evaluator's model inputs are RobustBench's tensors; its clean accuracy is the direct one; eval.json records
    the pre-processing; the export's robustbench_model_info.json takes that evaluation's accuracy."""
    from atscale.evaluate import evaluate_checkpoint, export_checkpoint
    from atscale.models import NormalizedModel

    model, cfg = trained_digits_model
    ckpt = cfg.run_dir / "checkpoints" / "last.pt"
    seen: list[torch.Tensor] = []

    def record(module, args):
        if isinstance(module, NormalizedModel):
            seen.append(args[0].detach().clone())

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        doc = evaluate_checkpoint(ckpt, [f"eval.suite={_clean_suite(tmp_path)}", "eval.preprocess=BicubicRes256Crop224",
                                         f"eval.jpeg_root={jpeg_root}", "eval.max_images=0", "log.progress=false",
                                         "data.eval_batch_size=8", "data.num_workers=1"])
    finally:
        hook.remove()
    x, y = _reference(jpeg_root, "BicubicRes256Crop224")
    batches = [x[i:i + 8] for i in range(0, 20, 8)]
    matched = {next((b for b, xb in enumerate(batches) if torch.equal(s, xb)), None) for s in seen}
    assert matched == {0, 1, 2}  # every input the model got is one of RobustBench's batches, and each batch came
    with torch.no_grad():
        direct = torch.cat([model(xb.contiguous(memory_format=torch.channels_last)).argmax(1) for xb in batches])
    assert doc["n"] == 20 and doc["results"]["clean"]["acc"] == (direct == y).sum().item() / 20
    assert doc["preprocess"] == {"name": "BicubicRes256Crop224", "jpeg_root": str(jpeg_root), "image_list": None,
                                 "n_images": 20, "skipped": {"count": 0, "files": []}}
    saved = json.loads((cfg.run_dir / "eval" / "cleanonly" / "eval.json").read_text())
    assert saved["preprocess"]["name"] == "BicubicRes256Crop224" and saved["eval_config"]["preprocess"] == \
        "BicubicRes256Crop224"

    out = export_checkpoint(ckpt, tmp_path / "export")
    info = json.loads((out / "robustbench_model_info.json").read_text())
    assert info["clean_acc"] == f"{100 * doc['results']['clean']['acc']:.2f}" and info["autoattack_acc"] == ""
    assert (info["architecture"], info["dataset"], info["eps"]) == ("ResNet-18", "digits", f"{cfg.eval.eps:g}/255")
    assert all(info[k] == "" for k in ("link", "authors", "venue", "reported"))
    assert info["additional_data"] is False and info["number_forward_passes"] == 1 and info["unreliable"] is False
    assert "BicubicRes256Crop224" in info["footnote"] and "no Linf AutoAttack row" in info["footnote"]
    assert info["atscale"]["eval_json"] == str(cfg.run_dir / "eval" / "cleanonly" / "eval.json")
    assert info["atscale"]["recipe"]["objective"] == "clean" and info["atscale"]["training_data"]["source"] == "digits"


def test_image_list_picks_exactly_the_listed_files(trained_digits_model, jpeg_root: Path, tmp_path: Path) -> None:
    """RobustBench's helper-file format: '<class>/<file>' lines, kept in file order, CRLF and a last line without a
    newline accepted."""
    from atscale.evaluate import evaluate_checkpoint

    files = sorted(p.relative_to(jpeg_root).as_posix() for p in jpeg_root.rglob("*.JPEG"))
    chosen = [files[17], files[2], files[9], files[10], files[0]]
    listing = tmp_path / "ids.txt"
    listing.write_bytes("\r\n".join(chosen).encode())
    loader = make_jpeg_loader(jpeg_root, CLASSES, "BicubicRes256Crop224", torch.device("cpu"), image_list=listing,
                              batch_size=4)
    assert [Path(f).relative_to(jpeg_root).as_posix() for f, _ in loader.samples] == chosen
    x, y = (torch.cat(t) for t in zip(*loader))
    ref = REFERENCE["BicubicRes256Crop224"]()
    assert torch.equal(x, torch.stack([ref(Image.open(jpeg_root / f).convert("RGB")) for f in chosen]))
    assert y.tolist() == [int(f.split("/")[0]) for f in chosen]

    _, cfg = trained_digits_model
    doc = evaluate_checkpoint(cfg.run_dir / "checkpoints" / "last.pt", [
        f"eval.suite={_clean_suite(tmp_path)}", "eval.preprocess=Res256Crop224", f"eval.jpeg_root={jpeg_root}",
        f"eval.image_list={listing}", f"eval.out={tmp_path / 'ev'}", "log.progress=false", "data.num_workers=1"])
    assert doc["n"] == 5 and doc["preprocess"]["image_list"] == str(listing) and doc["preprocess"]["n_images"] == 5


def test_bad_folders_and_lists_are_refused(trained_digits_model, jpeg_root: Path, tmp_path: Path, capfd) -> None:
    import shutil

    from atscale.cli import main as cli

    tree = tmp_path / "val"
    shutil.copytree(jpeg_root, tree)
    shutil.rmtree(tree / "9")
    with pytest.raises(DatasetError, match=r"lacks the class folder\(s\) \['9'\]"):
        list_samples(tree, CLASSES)
    shutil.copytree(jpeg_root / "9", tree / "cat")
    with pytest.raises(DatasetError, match=r"class folders the run was not trained on: \['cat'\]"):
        list_samples(tree, CLASSES[:9])
    listing = tmp_path / "ids.txt"
    for lines, message in ((["0/x.JPEG"], r"line 1 .* does not exist"),
                           (["cat/a.JPEG"], r"line 1 .* names class folder 'cat', which is not one of the run's"),
                           ([next(p.name for p in (jpeg_root / "1").iterdir())], r"is not '<class folder>/<file>'")):
        real = next(p for p in (jpeg_root / "0").iterdir()).relative_to(jpeg_root).as_posix()
        listing.write_text("\n".join([real, ""] + lines) + "\n")
        with pytest.raises(DatasetError, match=message.replace("line 1", "line 3")):
            list_samples(jpeg_root, CLASSES, listing)
    with pytest.raises(DatasetError, match="keeps each image's size"):
        make_jpeg_loader(jpeg_root, CLASSES, "none", torch.device("cpu"))

    ckpt = str(trained_digits_model[1].run_dir / "checkpoints" / "last.pt")
    capfd.readouterr()
    assert cli(["eval", ckpt, "eval.preprocess=Res224", "--no-progress"]) == 2  # digits: no ImageFolder source
    assert "eval.jpeg_root is not set" in capfd.readouterr().err
    assert cli(["eval", ckpt, "eval.preprocess=Res224", f"eval.jpeg_root={tree}", "--no-progress"]) == 2
    assert "class folders the run was not trained on: ['cat']" in capfd.readouterr().err


def test_model_info_accuracies_only_from_robustbench_preprocessing(trained_digits_model) -> None:
    """An evaluation on an FFCV center crop that changes the pixels is not RobustBench's: accuracies stay empty; the
    identity crop of the stored digits pixels (RobustBench's ToTensor) and a JPEG pre-processing fill them."""
    from atscale.config import with_overrides
    from atscale.evaluation.model_info import robustbench_model_info

    _, cfg = trained_digits_model
    meta = {"source": "digits", "classes": CLASSES, "num_classes": 10, "image_size": 32}
    results = {"clean": {"acc": 0.5, "attack": "clean", "kind": "clean", "eps": 0.0},
               "aa": {"acc": 0.25, "attack": "standard", "norm": "linf", "eps": 4.0, "targeted": False}}
    doc = {"results": results, "n": 8, "suite": {"name": "robustbench"}, "flags": []}
    cropped = with_overrides(cfg, ["data.val_crop_ratio=0.875"], ("data",))
    info = robustbench_model_info(cropped, meta, {**doc, "preprocess": {"name": "ffcv", "val_size": 32,
                                                                        "val_crop_ratio": 0.875}})
    assert info["clean_acc"] == info["autoattack_acc"] == "" and "did not pre-process" in info["footnote"]
    assert info["eps"] == "4/255"
    info = robustbench_model_info(cfg, meta, doc)  # the run's own identity crop
    assert (info["clean_acc"], info["autoattack_acc"]) == ("50.00", "25.00")
    jpeg = {"name": "Res224", "jpeg_root": "/v", "image_list": None}
    info = robustbench_model_info(cropped, meta, {**doc, "preprocess": jpeg, "flags": [{"severity": "error"}]})
    assert (info["clean_acc"], info["autoattack_acc"], info["unreliable"]) == ("50.00", "25.00", True)
    finetuned = with_overrides(cfg, ["model.init_from=/w/pretrained.safetensors"], ("model",))
    info = robustbench_model_info(finetuned, meta, None)
    assert info["additional_data"] == "" and "additional_data" in info["atscale"]["unknown_fields"]
    assert info["clean_acc"] == "" and "no evaluation" in info["footnote"]


def test_training_final_eval_and_export_use_the_robustbench_preprocessing(digits_root: Path, jpeg_root: Path,
                                                                          tmp_path: Path) -> None:
    """A training run with eval.preprocess evaluates its final model on the val JPEGs (the 20 images of the folder,
    not the 359 of the .beton) and exports robustbench_model_info.json with that evaluation's clean accuracy."""
    from atscale.config import load_config
    from atscale.train import main
    from conftest import tiny_overrides

    over = tiny_overrides(digits_root, tmp_path, "rb", **{
        "run.max_steps": 0, "schedule.epochs": 1, "eval.preprocess": "BicubicRes256Crop224",
        "eval.jpeg_root": str(jpeg_root), "eval.max_images": 0, "run.export": True, "data.num_workers": 1,
        "data.eval_batch_size": 8})
    res = main(load_config(None, over))
    doc = json.loads((tmp_path / "rb" / "eval.json").read_text())
    assert doc["n"] == 20 and doc["preprocess"]["name"] == "BicubicRes256Crop224"
    info = json.loads((tmp_path / "rb" / "export" / "robustbench_model_info.json").read_text())
    assert info["clean_acc"] == f"{100 * res['eval']['clean']['acc']:.2f}"
