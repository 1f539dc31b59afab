"""A reproducible random-resized crop for FFCV (Inception-style crop, the training augmentation of PROTOCOLS.md).

FFCV's ``RandomResizedCropRGBImageDecoder`` draws each crop from numba's per-thread generator, which nothing seeds:
two runs with the same ``run.seed`` train on different crops, and a resumed epoch sees crops the interrupted one never
did. This decoder seeds numba's generator before every image's draw from (seed, the batch's sample indices, the
sample's index). The batch's indices come from the loader's order, which is seeded by ``seed + epoch``, so the crops
are a function of (seed, epoch, rank's batch, image): the same for every thread count and across resumes, and new in
every epoch. The draw itself (area in ``scale``, log-uniform aspect ratio, 10 tries, then a center crop) and the
decode/resize are FFCV's own compiled pieces.
"""
from __future__ import annotations

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder, get_random_crop
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.compiler import Compiler

__all__ = ["SeededRandomResizedCrop"]

_MOD = 2**31 - 1  # keeps every intermediate product inside int64


class SeededRandomResizedCrop(RandomResizedCropRGBImageDecoder):
    """``RandomResizedCropRGBImageDecoder`` with reproducible crops (see the module docstring)."""

    def __init__(self, output_size: tuple[int, int], seed: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        super().__init__(output_size, scale=scale, ratio=ratio)
        self.seed = int(seed)

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        draw_c = Compiler.compile(get_random_crop)
        scale, ratio = np.array(self.scale, dtype=np.float64), np.array(self.ratio, dtype=np.float64)
        base = np.int64(self.seed % _MOD)
        mod = np.int64(_MOD)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            key = np.int64(0)
            for k in range(len(batch_indices)):
                key = (key * np.int64(1_000_003) + np.int64(batch_indices[k])) % mod
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                np.random.seed(np.uint32((base * np.int64(7_919) + key * np.int64(104_729)
                                          + np.int64(source_ix) % mod) % np.int64(2**32)))
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                i, j, h, w = draw_c(height, width, scale, ratio)
                resize_crop_c(image, i, i + h, j, j + w, destination[dst_ix])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode
