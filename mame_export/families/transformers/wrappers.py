"""What the transformers family's graphs run: a transformers model behind a forward of
plain tensors in, plain tensors out. ``mame_export.apply`` accepts a wrapper and patches
the model inside it (``.model``); the wrappers work patched or not."""

from __future__ import annotations

import torch
import torch.nn as nn


class HFExport(nn.Module):
    """``pixels`` (B, 3, H, W), or a ``video`` (B, 3, T, H, W), -> one field of the model's
    output (``logits``, ``pooler_output``, ``last_hidden_state`` ...)."""

    wraps_hf_vision = True

    def __init__(self, model: nn.Module, output: str, video: bool = False) -> None:
        super().__init__()
        self.model = model
        self.output = output
        self.video = video

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.video:  # the graph's (B, C, T, H, W) -> transformers' (B, T, C, H, W)
            pixels = pixels.permute(0, 2, 1, 3, 4)
        return getattr(self.model(pixel_values=pixels), self.output)


class LlavaVisionTower(nn.Module):
    """What LLaVA-1.5's projector consumes from its CLIP tower: the second-to-last layer's
    hidden states without the class token, (B, N', C), and their token sizes (B, N', 1)
    in float32 (all ones when nothing merged). The last layer is never run."""

    wraps_hf_vision = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def mame_layers_run(self) -> int:
        return len(self.model.encoder.layers) - 1

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if getattr(self.model, "_mame_plan", None) is None:
            # LLaVA's own call: vision_tower(..., output_hidden_states=True).hidden_states[-2]
            hidden = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
            sizes = hidden.new_ones(hidden.shape[0], hidden.shape[1], 1, dtype=torch.float32)
        else:
            hidden, sizes = self.model.mame_hidden(pixels, upto=self.mame_layers_run)
        return hidden[:, 1:], sizes[:, 1:]
