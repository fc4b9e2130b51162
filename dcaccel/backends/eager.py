"""PyTorch eager: the split graphs as they are. The reference point for every other backend."""

from __future__ import annotations

import torch

from ..buffers import FeatureBuffer
from ..split import split_unet


class EagerRunner:
    static_shapes = None

    def __init__(self, unet, branch: int):
        self.full, self.shallow = split_unet(unet, branch)
        self._buffer = FeatureBuffer()

    @property
    def feature(self) -> torch.Tensor | None:
        return self._buffer.tensor

    def run_full(self, inputs):
        noise, feature = self.full(**inputs)
        self._buffer.store(feature)
        return noise

    def run_shallow(self, inputs):
        return self.shallow(**inputs, feature=self._buffer.get())


def create_runner(unet, branch: int, pipe=None, **options):
    if options:
        raise ValueError(f"backend 'eager' takes no options, got {sorted(options)}")
    return EagerRunner(unet, branch)
