"""The supported architecture families, as passes and targets see them: SD 1.x (`sd15`), SD 2.x (`sd21`), SDXL.

One `ArchSpec` per family: the diffusers pipeline class that runs it, its text encoders, and its default
guidance scale. A pass reads its model's spec from `PassContext.spec`; detection from checkpoints and the
shipped diffusers configs live in `sdcompiler.archs`, which builds on this table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    """What the compiler needs to know about one architecture family."""

    name: str
    pipeline_class: str
    text_encoders: tuple[str, ...]
    default_guidance_scale: float
    description: str

    @property
    def is_sdxl(self) -> bool:
        return self.name == "sdxl"


ARCHS: dict[str, ArchSpec] = {
    "sd15": ArchSpec("sd15", "StableDiffusionPipeline", ("text_encoder",), 7.5, "Stable Diffusion 1.x"),
    "sd21": ArchSpec("sd21", "StableDiffusionPipeline", ("text_encoder",), 7.5, "Stable Diffusion 2.x"),
    "sdxl": ArchSpec(
        "sdxl", "StableDiffusionXLPipeline", ("text_encoder", "text_encoder_2"), 5.0, "Stable Diffusion XL"
    ),
}
