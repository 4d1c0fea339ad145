"""Checkpoint factories: real diffusers folders with random weights, built offline.

`make_checkpoint(path, arch, size, seed)` writes a diffusers pipeline folder:

- `size="full"`: the real SD1.5 / SD2.1 (768-v) / SDXL-base architecture from
  the shipped configs (U-Net 859,520,964 / 865,910,724 / 2,567,463,684
  params) with the real CLIP vocabulary. Our stand-in for real weights.
- `size="tiny"`: the same block structure at tiny widths, so every
  structural pass meets the real topology: SD has 4 stages (3 cross-attention
  down stages + 1 plain, mirrored up), 2 layers per block and a cross-attention
  mid-block; SDXL has 3 stages with transformer depths [1, 2, 10] and the
  `text_time` added embedding. Text encoders are 2-layer CLIP models over a
  514-token byte-level vocabulary; the VAE has the real 4 stages (8x), so
  resolutions behave as in the real pipelines. Builds in about a second.
- `arch="sdxl-refiner"`: the SDXL refiner's layout (diffusers'
  `StableDiffusionXLImg2ImgPipeline` with `text_encoder_2` / `tokenizer_2`
  only, `requires_aesthetics_score`, a 4-stage U-Net taking 5 time ids); its
  tiny text encoder has the tiny SDXL's `text_encoder_2` config and tokenizer,
  so a tiny base and refiner pair up.
- `size="digits"` (SD1.5 only): the tiny SD1.5 layout *trained* on real
  handwritten digits by `benchmarks/train_digits.py` (64x64 images, 8x8
  latents; captions like "a handwritten digit seven"), shipped in the package
  as fp16 (`data/digits-sd15/`) and written out as fp32. `seed` does not
  change it. `sdcompiler.digits` judges what it draws.

`variant="inpaint"` (tiny and full) gives the arch's inpainting layout instead: a U-Net with 9 input channels
(latents, mask, masked-image latents), saved as diffusers' `StableDiffusion[XL]InpaintPipeline` folder, as the
SD1.5 / SD2 / SDXL inpainting checkpoints are.

Configs can be overridden per component (`unet={"layers_per_block": 1}`), as
diffusers' `get_dummy_components` and modelopt's `get_tiny_unet` allow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from sdcompiler.archs import INPAINT_IN_CHANNELS, assemble_pipeline, bytes_to_unicode, get_arch, shipped_config_dir
from sdcompiler.errors import CheckpointError

SIZES = ("tiny", "full", "digits")
VARIANTS = (None, "inpaint")
DIGITS_MODEL = Path(__file__).resolve().parent / "data" / "digits-sd15"

# Tiny widths per arch: block structure of the real model, widths divided down.
_TINY_UNET: dict[str, dict[str, Any]] = {
    "sd15": dict(
        block_out_channels=[32, 32, 64, 64],
        attention_head_dim=4,
        norm_num_groups=8,
        cross_attention_dim=32,
        sample_size=16,
    ),
    "sd21": dict(
        block_out_channels=[32, 32, 64, 64],
        attention_head_dim=[2, 2, 4, 4],
        norm_num_groups=8,
        cross_attention_dim=32,
        sample_size=16,
    ),
    "sdxl": dict(
        block_out_channels=[32, 64, 64],
        attention_head_dim=[2, 4, 4],
        norm_num_groups=8,
        cross_attention_dim=64,
        sample_size=16,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    ),
    # the refiner's 4 stages (plain, 2 cross-attention, plain) with 4 transformers each, conditioned on the
    # tiny SDXL's second text encoder alone (32 wide), its 5 time ids ending with the aesthetic score
    "sdxl-refiner": dict(
        block_out_channels=[32, 32, 64, 64],
        attention_head_dim=[2, 2, 4, 4],
        norm_num_groups=8,
        cross_attention_dim=32,
        sample_size=16,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=5 * 8 + 32,
    ),
}
_TINY_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32, vocab_size=514
)
_TINY_VAE = dict(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4, sample_size=128)


def make_checkpoint(
    path: str | Path,
    arch: str = "sd15",
    size: str = "tiny",
    seed: int = 0,
    *,
    unet: Mapping[str, Any] | None = None,
    vae: Mapping[str, Any] | None = None,
    text_encoder: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    variant: str | None = None,
) -> Path:
    """Write a diffusers folder for `arch` ("sd15" | "sd21" | "sdxl" | "sdxl-refiner") at `size` ("tiny" | "full" |
    "digits").

    Args:
        path: destination folder (created; must be empty unless `overwrite`).
        arch: architecture family.
        size: "tiny" for tests, "full" for the real architecture (random weights), "digits" for the
            trained digits model (sd15 only).
        seed: seeds every weight; the same seed gives the same files (ignored by "digits").
        unet, vae, text_encoder: config overrides for that component.
        overwrite: replace an existing non-empty folder.
        variant: None (text-to-image) or "inpaint" (a 9-channel inpainting U-Net, an inpainting pipeline folder).

    Returns:
        The folder, loadable by `DiffusionPipeline.from_pretrained` and by
        `compile_pipeline`.
    """
    import diffusers
    import transformers

    spec = get_arch(arch)
    if size not in SIZES:
        raise CheckpointError(f"unknown size {size!r}; choose 'tiny', 'full' or 'digits'")
    if variant not in VARIANTS:
        raise CheckpointError(f"unknown variant {variant!r}; choose None (text-to-image) or 'inpaint'")
    if variant and arch == "sdxl-refiner":
        raise CheckpointError("the refiner has no inpainting variant here; use arch 'sdxl' with variant='inpaint'")
    if size == "digits" and (arch != "sd15" or unet or vae or text_encoder or variant):
        raise CheckpointError(
            f"only arch 'sd15' has size 'digits' (a trained model, no config overrides or variant); got {arch!r}"
        )
    marker = {"arch": arch, "size": size, "seed": seed} | ({"variant": variant} if variant else {})
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        if (path / "model_index.json").exists() and json.loads((path / "model_index.json").read_text()).get(
            "_sdcompiler_testing"
        ) == marker:
            return path  # already built with the same arguments
        raise CheckpointError(f"{path} exists and is not empty; pick another folder or pass overwrite=True")

    if size == "digits":
        return _write_digits_model(path, {"arch": arch, "size": size, "seed": seed}, overwrite)

    configs = shipped_config_dir(arch)
    read = lambda component, name="config.json": json.loads((configs / component / name).read_text())  # noqa: E731

    unet_config = read("unet") | (_TINY_UNET[arch] if size == "tiny" else {})
    if variant == "inpaint":
        unet_config["in_channels"] = INPAINT_IN_CHANNELS
    unet_config |= dict(unet or {})
    vae_config = read("vae") | (_TINY_VAE if size == "tiny" else {}) | dict(vae or {})
    scheduler_config = read("scheduler", "scheduler_config.json")

    torch.manual_seed(seed)
    components: dict[str, Any] = {}
    components["unet"] = diffusers.UNet2DConditionModel.from_config(_public(unet_config))
    components["vae"] = diffusers.AutoencoderKL.from_config(_public(vae_config))
    scheduler_cls = getattr(diffusers, scheduler_config["_class_name"])
    components["scheduler"] = scheduler_cls.from_config(scheduler_config)

    for encoder_name, tokenizer_name in zip(spec.text_encoders, spec.tokenizers):
        tokenizer_dir = configs / tokenizer_name
        tokenizer_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
        if size == "tiny":
            tokenizer = _tiny_tokenizer(tokenizer_config["pad_token"])
        else:
            tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
        text_config = read(encoder_name) | (_TINY_TEXT if size == "tiny" else {}) | dict(text_encoder or {})
        if size == "tiny":  # the pooled output is taken at eos_token_id: it must be the tokenizer's
            text_config |= dict(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        model_cls = getattr(transformers, text_config["architectures"][0])
        config = transformers.CLIPTextConfig(**{k: v for k, v in text_config.items() if k != "architectures"})
        components[encoder_name] = model_cls(config).eval()
        components[tokenizer_name] = tokenizer

    pipe = assemble_pipeline(spec, components, read("", "model_index.json"))
    if variant == "inpaint":  # saved as diffusers' inpainting pipeline class (what model_index.json names)
        pipe = diffusers.AutoPipelineForInpainting.from_pipe(pipe)

    if overwrite and path.exists():
        import shutil

        shutil.rmtree(path)
    pipe.save_pretrained(path, safe_serialization=True)
    index = json.loads((path / "model_index.json").read_text())
    index["_sdcompiler_testing"] = marker
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def _write_digits_model(path: Path, marker: dict, overwrite: bool) -> Path:
    """Copy the shipped digits model to `path`, its fp16 weights as fp32 (what a fresh training run holds)."""
    import shutil
    import tempfile

    from safetensors.torch import load_file, save_file

    if not (DIGITS_MODEL / "model_index.json").is_file():
        raise CheckpointError(
            f"the trained digits model is missing from {DIGITS_MODEL}; run benchmarks/train_digits.py"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    for source in sorted(DIGITS_MODEL.rglob("*")):
        target = staging / source.relative_to(DIGITS_MODEL)
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif source.suffix == ".safetensors":
            target.parent.mkdir(parents=True, exist_ok=True)
            tensors = {k: v.float() if v.is_floating_point() else v for k, v in load_file(source).items()}
            save_file(tensors, target, metadata={"format": "pt"})
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    index = json.loads((staging / "model_index.json").read_text())
    index["_sdcompiler_testing"] = marker
    (staging / "model_index.json").write_text(json.dumps(index, indent=2))
    if path.exists():  # empty, or overwrite was asked for (checked by make_checkpoint)
        shutil.rmtree(path)
    staging.rename(path)
    return path


def _public(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _tiny_tokenizer(pad_token: str):
    """A 514-token byte-level CLIP tokenizer: bytes, bytes + `</w>`, BOS, EOS; no merges."""
    import tempfile

    import transformers

    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        Path(tmp, "merges.txt").write_text("#version: 0.2\n")
        return transformers.CLIPTokenizer.from_pretrained(tmp, model_max_length=77, pad_token=pad_token)


def make_controlnet(
    path: str | Path,
    checkpoint: str | Path,
    seed: int = 0,
    *,
    zero_conv_std: float = 0.05,
    overwrite: bool = False,
) -> Path:
    """Write a diffusers `ControlNetModel` folder that fits the U-Net of `checkpoint` (a `make_checkpoint` folder).

    The ControlNet copies the U-Net's encoder (`ControlNetModel.from_unet`, so its down / mid residuals have the
    U-Net's shapes); its condition embedding gets He-initialized convs, and its zero convolutions (the residual projections and the condition embedding's last conv),
    which training starts at zero, get seeded random weights of std `zero_conv_std`, so the residuals move the
    images and a test comparing pipelines is not trivially met by residuals of zero.

    Returns:
        The folder, loadable by `ControlNetModel.from_pretrained` and by `compile_pipeline(controlnet=...)`.
    """
    import diffusers

    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise CheckpointError(f"{path} exists and is not empty; pick another folder or pass overwrite=True")
    unet = diffusers.UNet2DConditionModel.from_pretrained(Path(checkpoint) / "unet")
    torch.manual_seed(seed)
    controlnet = diffusers.ControlNetModel.from_unet(unet)
    embedding = controlnet.controlnet_cond_embedding
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block, embedding.conv_out]
    with torch.no_grad():
        # the condition embedding's convs at He init: at diffusers' default init its output barely depends on
        # the image (activations shrink through its 7 convs), so different control images would look alike
        for conv in [embedding.conv_in, *embedding.blocks]:
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            conv.bias.zero_()
        for conv in zero_convs:
            conv.weight.normal_(0.0, zero_conv_std)
            conv.bias.normal_(0.0, zero_conv_std)
    if overwrite and path.exists():
        import shutil

        shutil.rmtree(path)
    controlnet.save_pretrained(path, safe_serialization=True)
    return path
