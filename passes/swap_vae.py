"""swap_vae: replace the pipeline's VAE with a tiny one (TAESD / TAESDXL, diffusers' `AutoencoderTiny`).

The full SD VAE decoder is a large share of a few-step pipeline (on the 2-core CPU here, decoding one
256x256 SD1.5 image costs as much as two U-Net calls); TAESD decodes the same latents with ~1/20 of the
parameters, at some loss of fine detail. The tiny VAE comes from a diffusers folder (`config.json` with
`_class_name: AutoencoderTiny` and safetensors weights), as `madebyollin/taesd` (SD 1.x/2.x) and
`madebyollin/taesdxl` (SDXL) are published: a local folder, or such a Hub id already in the local Hugging Face
cache (looked up with `local_files_only=True`, never downloaded, as checkpoints are); the pass checks the class and the latent channels, not which
family the weights were trained for (taesd on SDXL latents decodes wrongly: use taesdxl there).

The U-Net is untouched. The VAE's `scaling_factor` (1.0 for TAESD, which scales internally) goes to the
artifact, so the runtime divides latents as diffusers' pipelines do with this VAE; its encoder returns
latents directly (no posterior to sample), which image-to-image uses as diffusers' `retrieve_latents` does.
Metrics: VAE parameters and decoder MACs per image at the MACs resolution, before and after.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from sdcompiler.passes.accounting import count_params, vae_decoder_macs
from sdcompiler.passes.base import Pass, PassContext, register_pass
from sdcompiler.passes.config import PassConfig
from sdcompiler.passes.errors import PassError


@dataclass(frozen=True)
class SwapVAEConfig(PassConfig):
    path: str = ""  # a diffusers AutoencoderTiny folder, or the Hub id of one in the local cache


ACCEPTED = (
    "a local diffusers AutoencoderTiny folder (config.json + .safetensors weights) or the Hugging Face id of one "
    "already in the local cache (e.g. madebyollin/taesd, fetched with `huggingface-cli download madebyollin/taesd`)"
)
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def tiny_vae_folder(path: str) -> Path:
    """The folder `path` names: itself when it exists, else the cached snapshot of the Hub id it spells."""
    if not path:
        raise PassError(
            f"swap_vae needs 'path': {ACCEPTED}; with the preset: {{preset: taesd, path: FOLDER}} "
            "(CLI: --recipe taesd:path=FOLDER)"
        )
    folder = Path(path)
    if folder.exists() or not _HUB_ID.fullmatch(path):
        if not folder.exists():
            raise PassError(f"tiny VAE {path} does not exist; pass {ACCEPTED}")
        return folder
    from huggingface_hub import snapshot_download  # passes do not import sdcompiler's loader: the same lookup

    try:
        return Path(snapshot_download(path, local_files_only=True))
    except Exception:  # not cached, malformed id or incomplete snapshot: the same advice applies
        raise PassError(
            f"tiny VAE {path} is neither a local folder nor a Hugging Face id in the local cache (no download "
            f"here); pass {ACCEPTED}"
        ) from None


def _check_folder(path: str) -> dict:
    folder = tiny_vae_folder(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise PassError(f"VAE folder {folder} has no config.json; pass a diffusers AutoencoderTiny folder")
    config = json.loads(config_file.read_text())
    if config.get("_class_name") != "AutoencoderTiny":
        raise PassError(
            f"VAE folder {folder} holds a {config.get('_class_name')!r}, not an AutoencoderTiny "
            "(TAESD); the full VAE is the checkpoint's own"
        )
    if not any(folder.glob("*.safetensors")):
        raise PassError(f"VAE folder {folder} has no .safetensors weights; pickle files can run code: convert them")
    return config


@register_pass
class SwapVAE(Pass):
    name = "swap_vae"
    controlnet = "keeps_layout"
    runtime_loras = True
    config_class = SwapVAEConfig
    stage = "noop"
    description = "replace the VAE with a tiny one (TAESD / TAESDXL, diffusers AutoencoderTiny)"

    def requires(self, pipe, config: SwapVAEConfig, ctx: PassContext) -> None:
        tiny = _check_folder(config.path)
        channels = pipe.vae.config.latent_channels
        if tiny.get("latent_channels", 4) != channels:
            raise PassError(
                f"the tiny VAE in {config.path} has {tiny.get('latent_channels', 4)} latent channels and "
                f"this {ctx.arch} model {channels}; use the tiny VAE made for this model family"
            )

    def run(self, pipe, config: SwapVAEConfig, ctx: PassContext) -> dict[str, float]:
        from diffusers import AutoencoderTiny

        factor = pipe.vae_scale_factor
        before = count_params(pipe.vae), vae_decoder_macs(pipe.vae, ctx.macs_resolution, factor)
        try:
            vae = AutoencoderTiny.from_pretrained(tiny_vae_folder(config.path), use_safetensors=True).eval()
        except (OSError, ValueError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise PassError(f"cannot load the tiny VAE in {config.path}: {first}") from None
        pipe.vae = vae.to(dtype=pipe.vae.dtype)
        after = count_params(vae), vae_decoder_macs(vae, ctx.macs_resolution, factor)
        return {
            "vae_params_before": float(before[0]),
            "vae_params_after": float(after[0]),
            "vae_decoder_macs_before": float(before[1]),
            "vae_decoder_macs_after": float(after[1]),
        }
