"""The supported architecture families, as passes and targets see them: SD 1.x (`sd15`), SD 2.x (`sd21`), SDXL,
and the SDXL refiner (`sdxl-refiner`).

One `ArchSpec` per family: the diffusers pipeline class that runs it, its text encoders, and its default
guidance scale. The refiner is an SDXL U-Net (its passes treat it as SDXL: `is_sdxl`) conditioned on the second
text encoder only, whose 5 added time ids end with an aesthetic score where the base's 6 end with the target size. A pass reads its model's spec from `PassContext.spec`; detection from checkpoints and the
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
    family: str = ""  # the family whose blocks it shares, when not its own name (the refiner's is "sdxl")
    aesthetic_time_ids: bool = False  # diffusers' `requires_aesthetics_score`: (size, crop, aesthetic score)

    @property
    def is_sdxl(self) -> bool:
        return (self.family or self.name) == "sdxl"

    @property
    def tokenizers(self) -> tuple[str, ...]:
        """The tokenizer of each text encoder, by diffusers' component names (`text_encoder_2` -> `tokenizer_2`)."""
        return tuple(name.replace("text_encoder", "tokenizer") for name in self.text_encoders)

    @property
    def time_ids(self) -> int:
        """How many added time ids an SDXL U-Net takes: original size, crop, then the target size (6) or an
        aesthetic score (5)."""
        return 5 if self.aesthetic_time_ids else 6


ARCHS: dict[str, ArchSpec] = {
    "sd15": ArchSpec("sd15", "StableDiffusionPipeline", ("text_encoder",), 7.5, "Stable Diffusion 1.x"),
    "sd21": ArchSpec("sd21", "StableDiffusionPipeline", ("text_encoder",), 7.5, "Stable Diffusion 2.x"),
    "sdxl": ArchSpec(
        "sdxl", "StableDiffusionXLPipeline", ("text_encoder", "text_encoder_2"), 5.0, "Stable Diffusion XL"
    ),
    "sdxl-refiner": ArchSpec(
        "sdxl-refiner",
        "StableDiffusionXLImg2ImgPipeline",
        ("text_encoder_2",),
        5.0,
        "Stable Diffusion XL refiner",
        family="sdxl",
        aesthetic_time_ids=True,
    ),
}
