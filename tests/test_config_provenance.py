"""A ``data.root`` override that points at no dataset, while ``data.source`` comes from the config file or defaults,
is refused before any work (a typo would otherwise build fresh digits at the typo and train on them); giving
``data.source`` with it builds there, and an existing dataset at the overridden root is used as is."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from atscale.cli import main as cli
from atscale.config import ConfigError, load_config, with_overrides

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def test_typo_in_data_root_override_is_refused(tmp_path: Path, capfd) -> None:
    typo = tmp_path / "data" / "digitz"
    rc = cli(["train", "--config", str(DEMO), f"data.root={typo}", f"run.out_dir={tmp_path / 'runs'}"])
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("atscale train: error: "), lines
    for fragment in (str(typo), "no meta.json", "data.source=digits", f"the config file '{DEMO}'", "fix the path",
                     "pass data.source=digits explicitly"):
        assert fragment in lines[0], (fragment, lines[0])
    assert not typo.exists() and not (tmp_path / "runs").exists()

    with pytest.raises(ConfigError, match="data.source=digits comes from the defaults"):
        load_config(None, [f"data.root={typo}"])
    with pytest.raises(ConfigError, match="comes from --twin digits"):
        load_config(REPO / "configs" / "imagenet" / "r152_iat.yaml", [f"data.root={typo}"], twin="digits")
    # `atscale eval --data TYPO` overrides the checkpoint's config the same way
    with pytest.raises(ConfigError, match=f"data.root override '{typo}' holds no dataset"):
        with_overrides(load_config(DEMO), [f"data.root={typo}"], ("eval", "data", "run", "log", "perf"))


def test_overrides_that_build_nothing_new_pass(tmp_path: Path) -> None:
    """No build would happen, or the root did not move: nothing to refuse."""
    nowhere = str(tmp_path / "nowhere")
    assert load_config(DEMO, [f"data.root={nowhere}", "data.build_if_missing=false"]).data.root == nowhere
    assert load_config(DEMO, ["data.root=data/digits"]).data.root == "data/digits"  # the file's own root
    assert load_config(DEMO, ["data.source=imagefolder", f"data.root={nowhere}"]).data.source == "imagefolder"
    folder_cfg = tmp_path / "folder.yaml"
    folder_cfg.write_text("data: {source: imagefolder, root: /ffcv/imagenet}\n")  # no data.src: nothing to build from
    assert load_config(folder_cfg, [f"data.root={nowhere}"]).data.root == nowhere
    with pytest.raises(ConfigError, match=f"data.source=imagefolder comes from the config file '{folder_cfg}'"):
        load_config(folder_cfg, [f"data.root={nowhere}", "data.src=/raw/imagenet"])


def test_explicit_source_builds_there_and_an_existing_dataset_is_accepted(tmp_path: Path) -> None:
    from atscale.data import ensure_dataset

    new = tmp_path / "fresh_digits"
    cfg = load_config(DEMO, [f"data.root={new}", "data.source=digits", "data.num_workers=1"])
    meta = ensure_dataset(cfg.data)  # what training does with it: builds digits at the explicit root
    assert meta["source"] == "digits" and (new / "meta.json").is_file() and (new / "train.beton").is_file()
    # now that a dataset is there, the root alone is enough, for training and for `atscale eval --data`
    assert load_config(DEMO, [f"data.root={new}"]).data.root == str(new)
    assert with_overrides(load_config(DEMO), [f"data.root={new}"], ("data",)).data.root == str(new)


def test_only_meta_json_is_looked_at(tmp_path: Path) -> None:
    """Config looks at the filesystem only: a folder with meta.json counts as a dataset (reading it is data's job)."""
    folder = tmp_path / "ds"
    folder.mkdir()
    with pytest.raises(ConfigError):
        load_config(DEMO, [f"data.root={folder}"])
    (folder / "meta.json").write_text(json.dumps({"source": "digits"}))
    assert load_config(DEMO, [f"data.root={folder}"]).data.root == str(folder)
