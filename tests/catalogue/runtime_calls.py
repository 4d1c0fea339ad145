"""Bad arguments to `sdcompiler generate`: refused by the preflight before the artifact is loaded, except the
latents turning NaN mid-run, which only the running loop can see (the model is loaded by then)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from catalogue import Case

LOADER = ("sdcompiler.targets.torch_target.TorchTarget.load",)


def _generate(*extra: str):
    def build(tmp: Path, inputs) -> list[str]:
        return [
            "generate",
            str(inputs.torch_artifact),
            "--prompt",
            "a cat",
            "--steps",
            "2",
            *extra,
            "--out",
            str(tmp / "x.png"),
        ]

    return build


def _tiny_image(tmp: Path, inputs) -> list[str]:
    Image.new("RGB", (3, 3)).save(tmp / "small.png")
    return _generate("--image", str(tmp / "small.png"))(tmp, inputs)


def _img2img(*extra: str):
    def build(tmp: Path, inputs) -> list[str]:
        Image.new("RGB", (128, 128)).save(tmp / "start.png")
        return _generate("--image", str(tmp / "start.png"), *extra)(tmp, inputs)

    return build


def _inpaint(image_size: int, mask_size: int, *extra: str):
    def build(tmp: Path, inputs) -> list[str]:
        Image.new("RGB", (image_size, image_size)).save(tmp / "start.png")
        Image.new("L", (mask_size, mask_size), 255).save(tmp / "mask.png")
        return _generate("--image", str(tmp / "start.png"), "--mask", str(tmp / "mask.png"), *extra)(tmp, inputs)

    return build


def _mask_only(tmp: Path, inputs) -> list[str]:
    Image.new("L", (128, 128), 255).save(tmp / "mask.png")
    return _generate("--mask", str(tmp / "mask.png"))(tmp, inputs)


def _case(name: str, extra: tuple[str, ...], words: tuple[str, ...], **kwargs) -> Case:
    return Case(name, _generate(*extra), words, unreached=kwargs.pop("unreached", LOADER), **kwargs)


CASES = [
    _case("generate guidance nan", ("--guidance", "nan"), ("guidance_scale", "finite")),
    _case("generate guidance inf", ("--guidance", "inf"), ("guidance_scale", "finite")),
    _case("generate guidance negative", ("--guidance", "-3"), ("guidance_scale", ">= 0")),
    _case("generate steps zero", ("--steps", "0"), ("num_inference_steps", "positive")),
    _case("generate steps absurd", ("--steps", "100000000"), ("100000000", "SDCOMPILER_MAX_STEPS")),
    _case("generate height not a multiple", ("--height", "100"), ("height=100", "multiple of 8")),
    _case("generate width negative", ("--width", "-64"), ("width=-64", "positive")),
    Case(
        "generate height below the gri u-net minimum",
        lambda tmp, inputs: [
            "generate",
            str(inputs.artifact("torch", "gri")),
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--height",
            "16",
            "--out",
            str(tmp / "x.png"),
        ],
        ("height=16", "32 px"),
        unreached=LOADER,
    ),
    _case("generate height 100000", ("--height", "100000"), ("height=100000", "SDCOMPILER_MAX_IMAGE_SIZE")),
    _case("generate a million images", ("--num-images", "1000000"), ("1000000", "SDCOMPILER_MAX_BATCH")),
    _case("generate zero images", ("--num-images", "0"), ("num_images_per_prompt", "positive")),
    _case(
        "generate more than memory",
        ("--height", "4096", "--width", "4096", "--num-images", "8"),
        ("8 image(s) of 4096x4096", "GiB", "SDCOMPILER_MEMORY_LIMIT"),
        env={"SDCOMPILER_MEMORY_LIMIT": "1G"},
    ),
    _case("generate strength without image", ("--strength", "0.5"), ("strength", "image")),
    Case("generate strength zero", _img2img("--strength", "0"), ("strength=0.0", "(0, 1]"), unreached=LOADER),
    Case("generate strength nan", _img2img("--strength", "nan"), ("strength=nan", "(0, 1]"), unreached=LOADER),
    Case("generate strength above one", _img2img("--strength", "1.5"), ("strength=1.5", "(0, 1]"), unreached=LOADER),
    Case("generate 3x3 start image", _tiny_image, ("height=0", "image"), unreached=LOADER),
    Case("generate mask of another size", _inpaint(128, 64), ("mask_image is 64x64", "image's size"), unreached=LOADER),
    Case("generate mask without image", _mask_only, ("--mask", "needs --image"), unreached=LOADER),
    Case("generate inpaint strength zero", _inpaint(128, 128, "--strength", "0"), ("strength=0.0",), unreached=LOADER),
    _case(
        "generate bad memory limit",
        ("--height", "64"),
        ("SDCOMPILER_MEMORY_LIMIT",),
        env={"SDCOMPILER_MEMORY_LIMIT": "lots"},
    ),
    # only the running loop sees this: the artifact is loaded, the step named, no image written
    _case("generate latents overflow", ("--guidance", "1e38"), ("NaN/Inf", "step", "guidance_scale"), unreached=()),
]
