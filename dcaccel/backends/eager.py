"""PyTorch eager: the split graphs as they are. The reference point for every other backend."""

from __future__ import annotations

import torch

from ..buffers import FeatureBuffer
from ..split import split_unet


class EagerRunner:
    static_shapes = None

    def __init__(self, unet, branch: int):
        self.branch = branch
        self.full, self.shallow = split_unet(unet, branch)
        self._buffer = FeatureBuffer()
        self.loras: list[dict] = []  # the fused LoRAs (dcaccel.lora records them here)

    def refit(self, unet) -> None:
        """Take the U-Net's current weights. Nothing to copy: the graphs share its parameters. They are cut
        again anyway (no copies, cheap), so that modules replaced rather than changed are seen too, e.g. unfused
        LoRA layers on conv_in, which the graphs hold directly."""
        self.full, self.shallow = split_unet(unet, self.branch)

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
