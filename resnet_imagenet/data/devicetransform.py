"""Caffe's DataTransformer, its device half: float work on whole uint8 batches in the main process.

DeviceTransform subtracts the mean and scales the loader's batches (data/feed.py); ten_crops makes the
10-crop views (the test and classify tools). Tensor methods only, and torch is imported when a
DeviceTransform is built, so importing this module (and the host half, data/transform.py) loads no torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from resnet_imagenet.data.transform import centre_offsets

if TYPE_CHECKING:
    import torch


class DeviceTransform:
    """uint8 NCHW batches on the device -> float32 ``(pixel - mean) * scale``, the mean mirrored with the image.

    ``mean`` is load_mean's C x H x W array: C x 1 x 1 (mean_value), crop x crop (subtracted after the
    crop, the seed's bgr.binaryproto) or any other size from a mean_file, which must be the image size and
    is read at the crop's source pixels (caffe: data_transformer.cpp). ``mean_file`` names the file the mean
    came from ("" for mean_value), ``layer`` the data layer, in errors.
    """

    def __init__(
        self,
        mean: np.ndarray | None,
        *,
        mean_file: str = "",
        crop: int = 0,
        scale: float = 1.0,
        random_crop: bool = False,
        device: torch.device | str = "cpu",
        layer: str = "",
    ):
        import torch  # here only: the host half runs without torch

        self.scale, self.layer = float(scale), layer
        self.mean = None if mean is None else torch.from_numpy(mean).to(device)
        # A crop-sized mean is subtracted after the crop; any other mean_file is cropped with the image.
        self.full = mean is not None and bool(mean_file) and not (crop and mean.shape[1:] == (crop, crop))
        if self.full and random_crop:
            raise ValueError(f"{mean_file}: random_resized_crop needs a crop-sized mean or mean_value")
        if mean is not None and not mean_file:
            self.mean = self.mean.view(1, -1, 1, 1)  # mean_value: one value per channel
        if self.full:  # row and column offsets of the crop window (the whole image without crop_size)
            h, w = (crop, crop) if crop else mean.shape[1:]
            self._rows = torch.arange(h, device=device)
            self._cols = torch.arange(w, device=device)

    def __call__(self, x: torch.Tensor, geo: torch.Tensor) -> torch.Tensor:
        """``x``: the uint8 batch on the device; ``geo``: its (h_off, w_off, flip, src_h, src_w) rows, on the host."""
        self._check(geo)
        x = x.float()
        if self.mean is not None:
            x.sub_(self._batch_mean(geo.to(x.device, non_blocking=x.is_cuda)))
        if self.scale != 1:
            x.mul_(self.scale)  # caffe: (pixel - mean) * scale
        return x

    def _check(self, geo: torch.Tensor) -> None:
        """A full-size mean fits every image: checked on the host copy (on the device .any() would wait for the GPU
        every batch)."""
        if not self.full:
            return
        src = geo[:, 3:]
        fits = (src == src.new_tensor(self.mean.shape[1:])).all(1)
        if not fits.all():
            bad = tuple(src[int((~fits).nonzero()[0, 0])].tolist())
            where = f"layer '{self.layer}': " if self.layer else ""
            fix = "use a crop-sized mean or mean_value"
            raise ValueError(f"{where}mean_file is {tuple(self.mean.shape[1:])} but an image is {bad}; {fix}")

    def _batch_mean(self, geo: torch.Tensor) -> torch.Tensor:
        """The mean to subtract from each image of the batch (``geo`` on the device)."""
        m = self.mean
        flip = geo[:, 2].bool()
        if self.full:
            rows = geo[:, 0:1] + self._rows  # B,h
            cols = geo[:, 1:2] + self._cols.flip(0).where(flip.view(-1, 1), self._cols)  # B,w, mirrored with the crop
            return m[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)
        if m.dim() == 3:  # crop-sized mean, mirrored along with the image
            return m.flip(-1).where(flip.view(-1, 1, 1, 1), m)
        return m


def crop_offsets_10(h: int, w: int, crop: int) -> list[tuple[int, int]]:
    """(h_off, w_off) of the 4 corner crops and the centre crop (the loader's TEST-phase centre)."""
    centre = centre_offsets(h, w, crop)  # also checks the size
    return [(0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop), centre]


def ten_crops(
    x: torch.Tensor, crop: int, mean: torch.Tensor | None = None, scale: float = 1.0, *, centre_only: bool = False
) -> Iterator[torch.Tensor]:
    """The 10 crops of a raw-pixel batch x (N, C, H, W): 5 crops, then the same 5 mirrored (or the centre only).

    The mean is subtracted at the crop's source pixels (a crop-sized mean as is), then the crop is mirrored and
    scaled, as Caffe's DataTransformer does: out = (pixel - mean) * scale.
    """
    h, w = x.shape[2:]
    if mean is not None and tuple(mean.shape[1:]) not in ((1, 1), (crop, crop), (h, w)):
        raise ValueError(f"mean of size {tuple(mean.shape[1:])} fits neither the crop {crop} nor the {h}x{w} images")
    mean = None if mean is None else mean.to(x.device)
    offsets = crop_offsets_10(h, w, crop)[4:] if centre_only else crop_offsets_10(h, w, crop)
    for flip in (False,) if centre_only else (False, True):
        for ho, wo in offsets:
            c = x[:, :, ho : ho + crop, wo : wo + crop]
            if mean is not None:
                full = mean.dim() == 3 and mean.shape[1:] == (h, w) and (h, w) != (crop, crop)
                c = c - (mean[:, ho : ho + crop, wo : wo + crop] if full else mean)
            if flip:
                c = c.flip(-1)
            yield c * scale if scale != 1 else c
