"""Bad inputs to ``atscale data imagefolder``, through the real CLI (``atscale.cli.main`` in a forked child with a
timeout, so a hang fails the test instead of stalling CI): every bad file is converted or counted and skipped, every
bad layout or output folder is one error line naming the fix (exit 2) found before any image is read, and a failed
build writes nothing into --out. Also FFCV's writer under supervision: an image larger than its default page, an
exception or a killed process in a writer worker."""
from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

import atscale.cli  # noqa: F401 - imported once here, not in every forked child (FFCV's import takes seconds)
import ffcv.fields  # noqa: F401
import ffcv.memory_allocator  # noqa: F401
import ffcv.writer  # noqa: F401
from atscale.data.sources import ArraySplit, FileSplit
from atscale.data.write import page_size_for

CLASSES = ("cat", "dog", "eel")
OUTPUTS = ("train.beton", "val.beton", "meta.json")


def _child(send, fn: Callable[[], Any]) -> None:
    os.setsid()  # one process group with FFCV's writer workers, so a hung run can be killed whole
    out, err = io.StringIO(), io.StringIO()
    sys.stdout, sys.stderr = out, err
    try:
        result = fn()
    except BaseException as e:  # noqa: BLE001 - reported to the parent as (type name, message, traceback)
        result = (type(e).__name__, str(e), traceback.format_exc())
    send.send((result, out.getvalue(), err.getvalue()))
    os._exit(0)


def _forked(fn: Callable[[], Any], timeout: float = 90) -> tuple[Any, str, str, float]:
    """Run ``fn`` in a forked child; (its result or (exception type, message, traceback), stdout, stderr, seconds).
    A child still running after ``timeout`` seconds is killed with its workers and the test fails."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    start = time.monotonic()
    proc = ctx.Process(target=_child, args=(send, fn))
    proc.start()
    send.close()
    if not recv.poll(timeout):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.join()
        pytest.fail(f"still running after {timeout} s: hung")
    result, out, err = recv.recv()
    proc.join()
    return result, out, err, time.monotonic() - start


def _cli(*args: str) -> tuple[int, str, str]:
    from atscale.cli import main

    result, out, err, _ = _forked(lambda: main(["data", "imagefolder", *args]))
    assert isinstance(result, int), f"not an exit status (an uncaught exception?): {result}"
    return result, out, err


def _save(path: Path, size: int = 16, mode: str = "RGB", fmt: str | None = None, seed: int = 0) -> None:
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert(mode).save(path, format=fmt or "JPEG")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``src/{train,val}/{cat,dog,eel}/`` with two 16x16 JPEGs each."""
    src = tmp_path / "src"
    for split in ("train", "val"):
        for c in CLASSES:
            (src / split / c).mkdir(parents=True)
            for i in range(2):
                _save(src / split / c / f"{c}{i}.JPEG", seed=i)
    return src


def _truncated(src: Path) -> None:
    _save(src / "train" / "cat" / "big.JPEG", size=64)
    data = (src / "train" / "cat" / "big.JPEG").read_bytes()
    (src / "train" / "cat" / "big.JPEG").write_bytes(data[: len(data) // 2])


# name: (change to the 'tree' fixture, expected (n_train, n_val, skipped))
HANDLED: dict[str, tuple[Callable[[Path], Any], tuple[int, int, int]]] = {
    "corrupt_bytes": (lambda s: (s / "train/dog/junk.JPEG").write_bytes(os.urandom(3000)), (6, 6, 1)),
    "truncated_jpeg": (_truncated, (6, 6, 1)),
    "zero_byte_file": (lambda s: (s / "val/cat/empty.jpg").write_bytes(b""), (6, 6, 1)),
    "cmyk_jpeg": (lambda s: _save(s / "train/cat/cmyk.JPEG", mode="CMYK"), (7, 6, 0)),
    "grayscale": (lambda s: _save(s / "train/dog/gray.JPEG", mode="L"), (7, 6, 0)),
    "png_named_jpeg": (lambda s: _save(s / "train/eel/png.JPEG", fmt="PNG"), (7, 6, 0)),
    "empty_val_class": (lambda s: [f.unlink() for f in (s / "val/eel").iterdir()], (6, 4, 0)),
}


@pytest.mark.parametrize("case", sorted(HANDLED))
def test_bad_files_are_converted_or_counted(case: str, tree: Path, tmp_path: Path) -> None:
    change, (n_train, n_val, skipped) = HANDLED[case]
    change(tree)
    rc, out, err = _cli("--src", str(tree), "--out", str(tmp_path / "out"))
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == {"source": "imagefolder", "num_classes": 3,
                                                        "n_train": n_train, "n_val": n_val, "skipped": skipped}
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["classes"] == list(CLASSES) and meta["skipped"]["count"] == skipped
    assert sorted(os.listdir(tmp_path / "out")) == sorted(OUTPUTS)  # the staging folder is gone


def _rm(path: Path) -> None:
    for p in sorted(path.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    path.rmdir()


def _file(path: Path) -> Path:
    path.write_text("not a folder")
    return path


# name: (change to the tree returning the --out to use (None: tmp/out), text in the error, text of its fix)
ERRORS: dict[str, tuple[Callable[[Path, Path], Any], str, str]] = {
    "missing_train": (lambda s, t: _rm(s / "train"), "train' does not exist", "ImageNet layout"),
    "missing_val": (lambda s, t: _rm(s / "val"), "val' does not exist", "ImageNet layout"),
    "val_without_class_folders": (lambda s, t: [_rm(s / "val" / c) for c in CLASSES], "no class folders",
                                  "val/<class>"),
    "val_class_not_in_train": (lambda s, t: _save(_mkdir(s / "val" / "fox") / "f.JPEG"), "train/ lacks",
                               "same classes"),
    "empty_class_dir": (lambda s, t: (s / "train" / "bass").mkdir(), "train/bass' hold no images",
                        "remove the folder(s) or add images"),
    "class_where_nothing_decodes": (lambda s, t: (_mkdir(s / "train" / "fish") / "x.JPEG").write_bytes(b"junk"),
                                    "train/fish' hold no image that decodes", "remove the folder(s) or add images"),
    "out_is_a_file": (lambda s, t: _file(t / "out"), "is a file", "pass a folder path as --out"),
    "out_under_a_file": (lambda s, t: _file(t / "blocker") / "out", "lies under the file", "--out"),
}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_layouts_and_outputs_are_one_line_errors_before_any_work(case: str, tree: Path, tmp_path: Path) -> None:
    change, problem, fix = ERRORS[case]
    out = change(tree, tmp_path)
    out = out if isinstance(out, Path) else tmp_path / "out"
    existed = out.exists()
    rc, stdout, err = _cli("--src", str(tree), "--out", str(out))
    errors = [line for line in err.splitlines() if line.startswith("atscale data: error:")]
    assert rc == 2 and len(errors) == 1, err
    assert problem in errors[0] and fix in errors[0], errors[0]
    assert "Traceback" not in err and not stdout
    assert "writing" not in err, err
    if case != "class_where_nothing_decodes":  # the layout and --out are checked before any image is read
        assert "checking" not in err, err
    assert out.exists() == existed and not (out.is_dir() and os.listdir(out))


def test_failed_build_leaves_the_previous_dataset_untouched(tree: Path, tmp_path: Path) -> None:
    """A build that fails after train.beton was written (here: val's writer) publishes nothing; the old files stay."""
    import atscale.data.write as write

    out = tmp_path / "out"
    out.mkdir()
    for name in OUTPUTS:
        (out / name).write_text(f"old {name}")
    real = write.write_beton

    def fail_on_val(split, path, **kw):
        if Path(path).name == "val.beton":
            raise write.DatasetError("val writer failed", "test")
        real(split, path, **kw)

    def run() -> int:
        write.write_beton = fail_on_val  # only in the forked child
        from atscale.cli import main

        return main(["data", "imagefolder", "--src", str(tree), "--out", str(out)])

    rc, _, err, _ = _forked(run)
    assert sorted(os.listdir(out)) == sorted(OUTPUTS)
    assert all((out / name).read_text() == f"old {name}" for name in OUTPUTS)
    assert rc == 2 and "val writer failed" in err and "writing train.beton" in err


def test_huge_noise_image_gets_a_page_that_fits(tree: Path, tmp_path: Path) -> None:
    """4000x3000 uniform noise re-encodes to ~11 MB of JPEG, more than FFCV's default 8 MiB page (the writer worker
    died and the build hung at 0% CPU); the page now follows the largest image."""
    from ffcv.reader import Reader

    noise = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tree / "train" / "dog" / "noise.png", compress_level=0)
    rc, out, err = _cli("--src", str(tree), "--out", str(tmp_path / "out"))
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["n_train"] == 7
    reader = Reader(str(tmp_path / "out" / "train.beton"))
    assert reader.page_size == 1 << 26  # 4000x3008x3 + headers, rounded up to a power of two
    image = reader.metadata["f0"]
    assert sorted(zip(image["width"].tolist(), image["height"].tolist()))[-1] == (4000, 3000)
    assert Reader(str(tmp_path / "out" / "val.beton")).page_size == 1 << 23


def test_page_size_follows_the_largest_capped_image() -> None:
    assert page_size_for([(16, 16)]) == 1 << 23
    assert page_size_for([(16, 16), (6000, 4000)]) == 1 << 27
    assert page_size_for([(6000, 4000)], max_resolution=1024) == 1 << 23
    with pytest.raises(Exception, match="'b.png' is 70000x10 pixels.*--max-resolution"):
        page_size_for([(5, 5), (70000, 10)], names=["a.png", "b.png"])
    assert page_size_for([(70000, 10)], max_resolution=4096) == 1 << 23


class _FailingFiles(FileSplit):
    """A split whose item ``bad`` raises (``how='raise'``) or kills its writer process (``how='kill'``)."""

    bad, how = 70, "raise"

    def __getitem__(self, i: int):
        if i == self.bad:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError("disk went away")
        return super().__getitem__(i)


def _write_in_child(split, path: Path, **kw) -> tuple[Any, float]:
    from atscale.data.write import write_beton

    result, _, err, seconds = _forked(lambda: write_beton(split, path, **kw), timeout=60)
    return result, seconds


@pytest.mark.parametrize("how,message", [("raise", "OSError: disk went away"), ("kill", "killed by signal 9")])
def test_writer_worker_failure_names_the_file_instead_of_hanging(how: str, message: str, tmp_path: Path) -> None:
    files = []
    for i in range(100):
        files.append(str(tmp_path / f"img{i:03d}.png"))
        _save(Path(files[-1]), size=8, fmt="PNG")
    split = _FailingFiles(files, [0] * 100)
    split.how = how
    result, seconds = _write_in_child(split, tmp_path / "out" / "x.beton", workers=2)
    assert result[0] == "DatasetError" and message in result[1] and "img070.png" in result[1], result
    assert seconds < 30
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_sample_larger_than_a_forced_page_is_an_error_not_a_hang(tmp_path: Path) -> None:
    images = np.zeros((3, 1500, 2000, 3), np.uint8)  # 9 MB raw each: more than an 8 MiB page
    result, seconds = _write_in_child(ArraySplit(images, np.zeros(3, int)), tmp_path / "x.beton", write_mode="raw",
                                      workers=2, page_size=1 << 23)
    assert result[0] == "DatasetError" and "item 0" in result[1] and "page size is 8388608" in result[1], result
    assert seconds < 30 and not (tmp_path / "x.beton").exists()
