"""FFCV ``.beton`` writing, supervised: :func:`write_beton` sizes FFCV's pages from the largest image (so a big image
cannot overflow one) and runs FFCV's writer processes itself (FFCV's own ``DatasetWriter`` loop waits forever when one
of them dies): any exception in a worker, or a worker killed outright, ends the write with a :class:`DatasetError`
naming the file. The file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import os
import queue
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from atscale.data.sources import ArraySplit, DatasetError, FileSplit

MIN_PAGE = 1 << 23  # FFCV's default page (8 MiB); pages must be powers of two below 2**32 (a uint32 in the header)
MAX_PAGE = 1 << 31
MAX_SIDE = (1 << 16) - 1  # FFCV stores width and height as uint16
HEADER_SLACK = 1 << 16  # JPEG markers and tables on top of the (padded) pixel data
CHUNK = 64


def _capped(width: int, height: int, max_resolution: int) -> tuple[int, int]:
    """The size FFCV's RGBImageField stores: the longest side scaled down to ``max_resolution`` (as its resizer)."""
    longest = max(width, height)
    if max_resolution and longest > max_resolution:
        ratio = max_resolution / longest
        return int(ratio * width), int(ratio * height)
    return width, height


def encoded_bound(width: int, height: int) -> int:
    """An upper bound on the bytes one image takes in a .beton: raw RGB, or a JPEG of it: OpenCV encodes 4:2:0, whose
    data stays below the pixels padded to 16x16 blocks at any quality (uniform noise at quality 100 takes about 2/3),
    plus the headers."""
    pad = lambda n: -(-n // 16) * 16  # noqa: E731
    return max(width * height * 3, pad(width) * pad(height) * 3 + HEADER_SLACK)


def page_size_for(sizes: Sequence[tuple[int, int]], max_resolution: int = 0,
                  names: Sequence[str] | None = None) -> int:
    """FFCV page size for images of ``sizes`` (width, height) after the ``max_resolution`` cap: a power of two that
    holds the largest encoded image, at least 8 MiB. Raises DatasetError when one cannot fit in any FFCV page."""
    worst, where = 0, 0
    for i, (w, h) in enumerate(sizes):
        w, h = _capped(w, h, max_resolution)
        bound = encoded_bound(w, h) if max(w, h) <= MAX_SIDE else MAX_PAGE + 1
        if bound > worst:
            worst, where = bound, i
    if worst > MAX_PAGE:
        name = names[where] if names is not None else f"image {where}"
        w, h = sizes[where]
        raise DatasetError(f"'{name}' is {w}x{h} pixels, too large for an FFCV dataset (at most {MAX_SIDE} per side "
                           f"and {MAX_PAGE >> 20} MiB encoded)",
                           "pass --max-resolution (data.max_resolution), e.g. 1024, or remove it")
    return max(MIN_PAGE, 1 << max(worst - 1, 1).bit_length())


def _split_sizes(split: Sequence) -> tuple[list[tuple[int, int]], list[str] | None] | None:
    """(sizes, file names) of a split's images, or None when they cannot be known without encoding them."""
    if isinstance(split, ArraySplit):
        h, w = split.images.shape[1:3]
        return [(w, h)] * min(1, len(split)), None
    if isinstance(split, FileSplit):
        if split.sizes is not None:
            return list(split.sizes), split.files
        sizes = []
        for f in split.files:  # the header only: PIL reads the size without decoding
            with Image.open(f) as im:
                sizes.append(im.size)
        return sizes, split.files
    return None


def _describe(split: Sequence, index: int) -> str:
    if index < 0:
        return "its first image"
    files = getattr(split, "files", None)
    return f"'{files[index]}'" if files is not None and index < len(files) else f"item {index}"


def _write_worker(slot: int, next_chunk, errors, current, metadata_sm, metadata_type, fields, allocator, done, results,
                  split: Sequence) -> None:
    """One writer process: takes chunks of CHUNK indices from the shared counter ``next_chunk`` and encodes them into
    FFCV pages (row i of the .beton is ``split[i]``). The first failure is reported at once, with the index being
    written, and ends the process without flushing its page: the build is abandoned."""
    from ffcv.writer import handle_sample

    metadata = np.frombuffer(metadata_sm.buf, dtype=metadata_type)
    n = len(split)
    try:
        allocator.__enter__()
        while True:
            with next_chunk.get_lock():
                start = next_chunk.value * CHUNK
                next_chunk.value += 1
            if start >= n:
                break
            for index in range(start, min(n, start + CHUNK)):
                current[slot] = index
                handle_sample(split[index], index, metadata_type.names, metadata, allocator, fields)
            with done.get_lock():
                done.value += min(n, start + CHUNK) - start
        allocator.__exit__(None, None, None)
    except BaseException as e:  # noqa: BLE001 - any failure must reach the main process, never end silently
        errors.put((int(current[slot]), " ".join(f"{type(e).__name__}: {e}".split())[:300]))
        return
    results.put(allocator.allocations)


class _Supervisor:
    """Runs :func:`_write_worker` processes and watches them: their error reports, exit codes and progress."""

    def __init__(self, split: Sequence, tmp: Path, name: str, writer, page_size: int, workers: int):
        from ffcv.memory_allocator import MemoryAllocator

        ctx = get_context("fork")  # as FFCV's writer: the workers share the split, the fields and the allocator
        self.split, self.name, self.n = split, name, len(split)
        self.results, self.errors = ctx.Queue(), ctx.SimpleQueue()
        self.done, self.current = ctx.Value("Q", 0), ctx.Array("q", [-1] * workers, lock=False)
        next_chunk = ctx.Value("Q", 0)
        allocator = MemoryAllocator(str(tmp), writer.data_region_start, page_size)
        self.procs = [ctx.Process(target=_write_worker, daemon=True, args=(
            slot, next_chunk, self.errors, self.current, writer.metadata_sm,
            writer.metadata_type, writer.fields, allocator, self.done, self.results, split))
            for slot in range(workers)]

    def _check(self, collecting: bool) -> None:
        """Raise DatasetError if a worker reported an exception or died, or if all exited with work or results
        missing (``collecting``: all images are written and the allocation tables are due)."""
        if not self.errors.empty():
            index, err = self.errors.get()
            raise DatasetError(f"writing {self.name} failed on {_describe(self.split, index)}: {err}",
                               "replace or remove that file and rebuild")
        for slot, p in enumerate(self.procs):
            if p.exitcode not in (None, 0):
                how = f"was killed by signal {-p.exitcode}" if p.exitcode < 0 else f"exited with status {p.exitcode}"
                oom = " (often out of memory)" if p.exitcode == -9 else ""
                raise DatasetError(f"a writer process for {self.name} {how}{oom} while encoding "
                                   f"{_describe(self.split, self.current[slot])}",
                                   "rebuild with fewer --workers or a --max-resolution cap, or remove that file")
        if (all(p.exitcode is not None for p in self.procs) and self.errors.empty()
                and (collecting or self.done.value < self.n)):
            raise DatasetError(f"the writer processes for {self.name} exited before writing all {self.n} "
                               f"images ({self.done.value} written)", "rebuild; report it if it repeats")

    def run(self) -> list:
        """Write everything; returns the workers' allocation tables. Stops every worker when anything fails."""
        try:
            for p in self.procs:
                p.start()
            with tqdm(total=self.n, desc=f"writing {self.name}", unit="img", mininterval=2) as bar:
                while bar.n < self.n:
                    time.sleep(0.05)
                    if self.done.value < self.n:
                        self._check(collecting=False)
                    bar.update(self.done.value - bar.n)
            allocations: list = []
            while len(allocations) < len(self.procs):
                finished = all(p.exitcode is not None for p in self.procs)  # so their tables were already sent
                try:
                    allocations.append(self.results.get(timeout=0.2))
                except queue.Empty:
                    self._check(collecting=finished)
            return [a for table in allocations for a in table]
        finally:
            for p in self.procs:
                if p.pid is not None:
                    if p.is_alive():
                        p.kill()
                    p.join()


def write_beton(split: Sequence, path: Path, write_mode: str = "jpg", max_resolution: int = 0, jpeg_quality: int = 90,
                workers: int = 2, page_size: int | None = None) -> None:
    """Write ``split`` (indexable (image, label) pairs) to ``path`` with FFCV, atomically (temporary name, then a
    rename). ``page_size``: FFCV's page; by default sized to the split's largest image (see :func:`page_size_for`).
    Raises DatasetError, never hangs, when any image fails to encode or a writer process dies."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    path = Path(path)
    if len(split) == 0:
        raise DatasetError(f"nothing to write to {path}: the split is empty", "add images to it")
    if page_size is None:
        known = _split_sizes(split)
        page_size = page_size_for(known[0], max_resolution, known[1]) if known else MIN_PAGE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution or None,
                                     jpeg_quality=jpeg_quality),
              "label": IntField()}
    workers = max(1, min(workers, -(-len(split) // CHUNK)))
    writer = DatasetWriter(str(tmp), fields, page_size=page_size, num_workers=workers)
    writer.num_samples = len(split)
    try:
        writer.prepare()
        try:
            writer.finalize(_Supervisor(split, tmp, path.name, writer, page_size, workers).run())
        finally:
            writer.metadata_sm.close()
            writer.metadata_sm.unlink()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


__all__ = ["write_beton", "page_size_for", "encoded_bound", "MIN_PAGE", "MAX_PAGE"]
