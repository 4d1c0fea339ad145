"""ControlNet on the torch and onnx targets: compiled pipelines with one or several ControlNets against
diffusers' `StableDiffusionControlNetPipeline` / `StableDiffusionXLControlNetPipeline` on the same components
and seed (images within 1e-5 on torch, 1e-3 on ONNX Runtime), and the one-line refusals.

The ControlNets come from `make_controlnet` (the tiny U-Net's encoder with seeded random zero convolutions),
so their residuals move the images; each case also checks that its ControlNet argument changes the images,
so agreement cannot come from an argument that is silently ignored.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdcompiler import compile_pipeline, load_compiled
from sdcompiler.errors import ConfigError, PipelineArgumentError
from sdcompiler.testing import make_controlnet

TOLERANCE = 1e-5
ONNX_TOLERANCE = 1e-3
CALL = dict(prompt=["a red cube on a table", "a fox"], num_inference_steps=3, guidance_scale=5.0, output_type="np")


@pytest.fixture(scope="module")
def controlnets(tiny_checkpoint, tmp_path_factory):
    """Factory: (arch, seed) -> a ControlNet folder that fits the tiny checkpoint of arch."""
    root, built = tmp_path_factory.mktemp("controlnets"), {}

    def get(arch: str, seed: int = 0):
        if (arch, seed) not in built:
            built[arch, seed] = make_controlnet(root / f"{arch}-{seed}", tiny_checkpoint(arch), seed=seed)
        return built[arch, seed]

    return get


@pytest.fixture(scope="module")
def artifact(tiny_checkpoint, controlnets, tmp_path_factory):
    """Factory: (arch, seeds, recipe, target) -> the artifact of arch with those ControlNets, compiled once."""
    root, built = tmp_path_factory.mktemp("controlnet_artifacts"), {}

    def get(arch: str, seeds: tuple[int, ...] = (0,), recipe="none", target="torch"):
        key = (arch, seeds, str(recipe), target)
        if key not in built:
            paths = [controlnets(arch, seed) for seed in seeds]
            built[key] = compile_pipeline(
                tiny_checkpoint(arch),
                recipe=recipe,
                target=target,
                output_dir=root / f"{arch}-{len(built)}",
                device="cpu",
                controlnet=paths[0] if len(paths) == 1 else paths,
            )
        return built[key]

    return get


def _reference(tiny_checkpoint, controlnets, arch: str, seeds: tuple[int, ...], img2img: bool = False):
    """diffusers' ControlNet pipeline (`img2img`: its image-to-image one) on the checkpoint's components and the
    same ControlNet folders."""
    import diffusers

    base = diffusers.DiffusionPipeline.from_pretrained(tiny_checkpoint(arch))
    nets = [diffusers.ControlNetModel.from_pretrained(controlnets(arch, seed)) for seed in seeds]
    if arch == "sdxl":
        cls = (
            diffusers.StableDiffusionXLControlNetImg2ImgPipeline
            if img2img
            else diffusers.StableDiffusionXLControlNetPipeline
        )
        extra = {"add_watermarker": False}
    else:
        cls = (
            diffusers.StableDiffusionControlNetImg2ImgPipeline
            if img2img
            else diffusers.StableDiffusionControlNetPipeline
        )
        extra = {}
    components = {k: v for k, v in base.components.items() if k not in ("safety_checker", "feature_extractor")}
    if arch != "sdxl":
        extra |= dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = cls(**components, controlnet=nets[0] if len(nets) == 1 else nets, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _control_image(seed: int, size: int = 128, kind: str = "pil"):
    pixels = np.random.default_rng(seed).random((size, size, 3)) ** (1 + 3 * seed)  # means 1/2, 1/5, 1/8, ...
    pixels[: size // 2, : size // (2 + seed)] = 1.0  # and a bright block of a different shape each
    if kind == "pil":
        return Image.fromarray((pixels * 255).astype(np.uint8))
    return pixels[None].astype(np.float32)  # a (1, H, W, 3) array in [0, 1]


def _seed():
    return torch.Generator().manual_seed(0)


def _close(got, expected, tolerance: float = TOLERANCE) -> float:
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape
    assert np.isfinite(got).all() and expected.std() > 0.01  # real images, not a constant
    error = float(np.abs(got - expected).max())
    assert error < tolerance, f"max abs error {error:.2e} >= {tolerance:.0e}"
    return error


def _differs(a, b) -> None:
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3, "the argument changed nothing"


def test_sd15_one_controlnet(tiny_checkpoint, controlnets, artifact):
    pipe = artifact("sd15")
    reference = _reference(tiny_checkpoint, controlnets, "sd15", (0,))
    image = _control_image(0)
    got = pipe(**CALL, image=image, controlnet_conditioning_scale=0.7, generator=_seed()).images
    expected = reference(**CALL, image=image, controlnet_conditioning_scale=0.7, generator=_seed()).images
    print(f"sd15 one ControlNet: max abs error {_close(got, expected):.2e}")
    _differs(got, pipe(**CALL, image=image, controlnet_conditioning_scale=0.2, generator=_seed()).images)
    _differs(got, pipe(**CALL, image=_control_image(1), controlnet_conditioning_scale=0.7, generator=_seed()).images)

    # guess mode (the nets see the conditional half only) and a guidance window of the steps
    window = dict(guess_mode=True, control_guidance_start=0.2, control_guidance_end=0.8, num_inference_steps=4)
    call = CALL | window
    got = pipe(**call, image=image, generator=_seed()).images
    expected = reference(**call, image=image, generator=_seed()).images
    print(f"sd15 guess mode + window: max abs error {_close(got, expected):.2e}")
    _differs(got, pipe(**call | {"guess_mode": False}, image=image, generator=_seed()).images)
    _differs(got, pipe(**call | {"control_guidance_start": 0.0}, image=image, generator=_seed()).images)

    manifest = pipe.manifest
    assert manifest["controlnets"][0]["folder"] == "controlnet"
    assert manifest["controlnets"][0]["source"]["sha256"]
    assert "controlnet/diffusion_pytorch_model.safetensors" in manifest["files"]
    assert "controlnet/config.json" in manifest["files"]


def test_a_recipe_file_names_the_controlnet(tiny_checkpoint, controlnets, artifact, tmp_path):
    """`controlnet:` in a recipe file (relative to it) compiles as `controlnet=` does: the same images; naming
    them in both places is refused in one line."""
    import shutil

    shutil.copytree(controlnets("sd15"), tmp_path / "nets" / "canny")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("version: 1\ncontrolnet: nets/canny\npasses: []\n")
    pipe = compile_pipeline(tiny_checkpoint("sd15"), recipe, "torch", tmp_path / "out", device="cpu")
    assert pipe.manifest["controlnets"][0]["folder"] == "controlnet"
    call = CALL | dict(num_inference_steps=2, image=_control_image(0))
    got = pipe(**call, generator=_seed()).images
    assert np.array_equal(got, artifact("sd15")(**call, generator=_seed()).images)
    with pytest.raises(ConfigError, match="the recipe names ControlNets .* give them in one place") as info:
        compile_pipeline(tmp_path / "missing", recipe, "torch", tmp_path / "o2", controlnet=controlnets("sd15"))
    assert "\n" not in str(info.value)


def test_sd15_two_controlnets(tiny_checkpoint, controlnets, artifact):
    """Per-net scales and guidance windows, several images per prompt; residuals summed as MultiControlNetModel;
    fuse_qkv kept with them."""
    pipe = artifact("sd15", (0, 1), recipe="fuse-qkv")
    reference = _reference(tiny_checkpoint, controlnets, "sd15", (0, 1))
    images = [_control_image(0), _control_image(1, kind="np")]
    call = CALL | dict(controlnet_conditioning_scale=[0.6, 1.2], control_guidance_end=[1.0, 0.5])
    call |= dict(num_images_per_prompt=2)  # one control image each, spread over 2 prompts x 2 images
    got = pipe(**call, image=images, generator=_seed()).images
    expected = reference(**call, image=images, generator=_seed()).images
    print(f"sd15 two ControlNets: max abs error {_close(got, expected):.2e}")
    _differs(got, pipe(**call | {"controlnet_conditioning_scale": [0.6, 0.0]}, image=images, generator=_seed()).images)
    assert [e["folder"] for e in pipe.manifest["controlnets"]] == ["controlnet_0", "controlnet_1"]
    assert [(r["name"], r["controlnet"]) for r in pipe.manifest["passes"]] == [("fuse_qkv", "keeps_layout")]
    reloaded = load_compiled(pipe.root, device="cpu")
    again = reloaded(**call, image=images, generator=_seed()).images
    assert np.array_equal(again, got)


def test_sdxl_one_controlnet(tiny_checkpoint, controlnets, artifact):
    pipe = artifact("sdxl")
    reference = _reference(tiny_checkpoint, controlnets, "sdxl", (0,))
    image = _control_image(2)
    got = pipe(**CALL, image=image, controlnet_conditioning_scale=0.8, generator=_seed()).images
    expected = reference(**CALL, image=image, controlnet_conditioning_scale=0.8, generator=_seed()).images
    print(f"sdxl one ControlNet: max abs error {_close(got, expected):.2e}")
    _differs(got, pipe(**CALL, image=image, controlnet_conditioning_scale=0.0, generator=_seed()).images)

    call = CALL | dict(guess_mode=True, control_guidance_start=0.3)
    got = pipe(**call, image=image, generator=_seed()).images
    expected = reference(**call, image=image, generator=_seed()).images
    print(f"sdxl guess mode + start: max abs error {_close(got, expected):.2e}")


# (arch, ControlNet seeds, target): image-to-image with ControlNet
IMG2IMG_CASES = [("sd15", (0,), "torch"), ("sdxl", (0,), "torch"), ("sd15", (0, 1), "onnx")]


@pytest.mark.parametrize(("arch", "seeds", "target"), IMG2IMG_CASES, ids=["sd15-torch", "sdxl-torch", "sd15-two-onnx"])
def test_image_to_image_with_controlnet(tiny_checkpoint, controlnets, artifact, arch, seeds, target):
    """image= the image to start from, control_image= the control image(s): diffusers'
    `StableDiffusion[XL]ControlNetImg2ImgPipeline` on the same components and seed, its defaults (strength 0.8,
    conditioning scale 0.8) included."""
    pipe = artifact(arch, seeds, target=target)
    reference = _reference(tiny_checkpoint, controlnets, arch, seeds, img2img=True)
    start = _control_image(5, kind="np") ** 0.5  # another picture than the control images
    control = [_control_image(s) for s in seeds]
    control = control[0] if len(seeds) == 1 else control
    call = CALL | dict(num_inference_steps=4, image=start, control_image=control)
    got = pipe(**call, generator=_seed()).images
    expected = reference(**call, generator=_seed()).images
    tolerance = TOLERANCE if target == "torch" else 1e-3
    print(f"{target} {arch} img2img, {len(seeds)} ControlNet(s): max abs error {_close(got, expected, tolerance):.2e}")
    call2 = call | dict(strength=0.5, controlnet_conditioning_scale=1.0 if len(seeds) == 1 else [1.0, 0.3])
    got2 = pipe(**call2, generator=_seed()).images
    print(f"  strength 0.5: max abs error {_close(got2, reference(**call2, generator=_seed()).images, tolerance):.2e}")
    _differs(got, got2)
    _differs(got, pipe(**call | dict(image=start**2), generator=_seed()).images)  # the start image matters
    other = [_control_image(s + 2) for s in seeds]
    _differs(got, pipe(**call | dict(control_image=other[0] if len(seeds) == 1 else other), generator=_seed()).images)


# (arch, ControlNet seeds, the call's ControlNet arguments, a second call's changes: guess mode, windows)
ONNX_CASES = [
    ("sd15", (0,), dict(controlnet_conditioning_scale=0.7), dict(guess_mode=True, control_guidance_start=0.2)),
    (
        "sd15",
        (0, 1),
        dict(controlnet_conditioning_scale=[0.6, 1.2], control_guidance_end=[1.0, 0.5]),
        dict(guess_mode=True, num_inference_steps=4),
    ),
    ("sdxl", (0, 1), dict(controlnet_conditioning_scale=[0.8, 0.5]), dict(guess_mode=True, control_guidance_end=0.7)),
]


@pytest.mark.parametrize(("arch", "seeds", "control", "second"), ONNX_CASES, ids=["sd15-one", "sd15-two", "sdxl-two"])
def test_onnx_matches_diffusers(tiny_checkpoint, controlnets, artifact, arch, seeds, control, second):
    """The onnx target: one graph per ControlNet, the U-Net graph with the residual inputs, ONNX Runtime sessions
    in the sampling loop; images within 1e-3 of diffusers', and every control image moves them."""
    import onnx

    pipe = artifact(arch, seeds, target="onnx")
    reference = _reference(tiny_checkpoint, controlnets, arch, seeds)
    images = [_control_image(seed + 2 * (arch == "sdxl"), kind=("pil", "np")[i % 2]) for i, seed in enumerate(seeds)]
    image = images[0] if len(seeds) == 1 else images
    for call in (CALL | control, CALL | control | second):
        got = pipe(**call, image=image, generator=_seed()).images
        expected = reference(**call, image=image, generator=_seed()).images
        error = _close(got, expected, ONNX_TOLERANCE)
        print(f"onnx {arch} {len(seeds)} ControlNet(s) {sorted(call)}: max abs error {error:.2e}")
    for index in range(len(seeds)):  # each net's control image reaches the U-Net
        moved = list(images)
        moved[index] = _control_image(5)
        again = pipe(**call, image=moved[0] if len(seeds) == 1 else moved, generator=_seed()).images
        _differs(got, again)

    folders = [entry["folder"] for entry in pipe.manifest["controlnets"]]
    assert folders == (["controlnet"] if len(seeds) == 1 else [f"controlnet_{i}" for i in range(len(seeds))])
    assert {f"{folder}/model.onnx" for folder in folders} <= set(pipe.manifest["files"])
    recorded = pipe.manifest["lowering"]["stages"][0]["settings"]["controlnet_residuals"]
    residuals = [*recorded["down_residuals"], recorded["mid_residual"]]
    graph = onnx.load(str(pipe.root / "unet" / "model.onnx"), load_external_data=False)
    assert [i.name for i in graph.graph.input][-len(residuals) :] == residuals
    net = onnx.load(str(pipe.root / folders[0] / "model.onnx"), load_external_data=False)
    assert [o.name for o in net.graph.output] == residuals
    assert [i.name for i in net.graph.input] == recorded["controlnet_inputs"]


def test_onnx_components_layout_refused(artifact, tmp_path):
    from sdcompiler.serving import export_server

    with pytest.raises(ConfigError, match="components layout does not serve ControlNet graphs yet") as info:
        export_server(artifact("sd15", target="onnx").root, tmp_path / "repo")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("recipe", "target", "match"),
    [
        ("bk-small", "torch", "pass 'prune_blocks' removes or reshapes the U-Net's down / mid blocks"),
        (
            "distill",
            "torch",
            "pass 'distill' is not yet checked with ControlNets; passes allowed with them: distill_cfg",
        ),
    ],
)
def test_compile_refusals(tmp_path, controlnets, recipe, target, match):
    """Refused before the checkpoint loads (the checkpoint path does not even exist), in one line."""
    with pytest.raises(ConfigError, match=match) as info:
        compile_pipeline(
            tmp_path / "missing", recipe=recipe, target=target, output_dir=tmp_path / "out", controlnet=["cn"]
        )
    assert "\n" not in str(info.value)


def test_compile_refuses_misfits(tmp_path, tiny_checkpoint, controlnets):
    from sdcompiler.errors import CheckpointError

    with pytest.raises(CheckpointError, match="does not fit this checkpoint's U-Net: block_out_channels") as info:
        compile_pipeline(
            tiny_checkpoint("sd15"), target="torch", output_dir=tmp_path / "out", controlnet=controlnets("sdxl")
        )
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="config.json; the folder is incomplete"):
        compile_pipeline(tiny_checkpoint("sd15"), target="torch", output_dir=tmp_path / "o", controlnet=tmp_path)


def test_call_refusals(artifact, compiled):
    one, two = artifact("sd15"), artifact("sd15", (0, 1), recipe="fuse-qkv")
    image = _control_image(0)
    cases = [
        (one, dict(), "this artifact has 1 ControlNet\\(s\\): pass image="),
        (one, dict(image=image, strength=0.5), "strength= is for ControlNet image-to-image: pass the control"),
        (one, dict(control_image=image), "control_image= is ControlNet image-to-image: pass image="),
        (two, dict(image=image, control_image=image), "pass control_image= as a list of 2 control images"),
        (
            one,
            dict(image=image, control_image=_control_image(0, 64)),
            "the control image is 64x64 and the image 128x128",
        ),
        (one, dict(image=image, controlnet_conditioning_scale=[0.5, 0.5]), "must be a number for one ControlNet"),
        (one, dict(image=image, control_guidance_start=0.9, control_guidance_end=0.5), "need 0 <= start < end"),
        (one, dict(image=image, guess_mode="yes"), "guess_mode='yes' must be True or False"),
        (two, dict(image=image), "pass image= as a list of 2 control images"),
        (two, dict(image=[image, image], controlnet_conditioning_scale=[1.0]), "has 1 values for 2 ControlNets"),
        (compiled("sd15", "torch"), dict(controlnet_conditioning_scale=0.5), "this artifact has no ControlNet"),
        (compiled("sd15", "torch"), dict(control_image=image), "control_image: this artifact has no ControlNet"),
    ]
    for pipe, kwargs, match in cases:
        with pytest.raises(PipelineArgumentError, match=match) as info:
            pipe(**CALL | kwargs)
        assert "\n" not in str(info.value)


def test_cli_compile_and_generate_with_control_image(tiny_checkpoint, controlnets, compiled, tmp_path, capsys):
    from sdcompiler.cli import main

    artifact_dir = tmp_path / "artifact"
    compile_args = ["compile", str(tiny_checkpoint("sd15")), "--target", "torch", "--out", str(artifact_dir)]
    assert main(compile_args + ["--controlnet", str(controlnets("sd15"))]) == 0
    assert f"controlnet: controlnet/ <- {controlnets('sd15').resolve()}" in capsys.readouterr().out
    assert main(compile_args + ["--recipe", "bk-small", "--controlnet", "cn"]) == 1
    assert "pass 'prune_blocks' removes or reshapes" in capsys.readouterr().err

    control = tmp_path / "control.png"
    _control_image(0).save(control)
    out = tmp_path / "image.png"
    base = ["generate", str(artifact_dir), "--prompt", "a fox", "--steps", "2", "--out", str(out)]
    assert main(base + ["--control-image", str(control), "--control-scale", "0.5"]) == 0
    assert Image.open(out).size == (128, 128)
    first = np.asarray(Image.open(out))
    start = tmp_path / "start.png"
    _control_image(3).save(start)
    img2img = ["--image", str(start), "--control-image", str(control), "--control-scale", "0.5", "--strength", "0.6"]
    assert main(base + img2img) == 0  # image-to-image with ControlNet
    assert np.abs(np.asarray(Image.open(out)).astype(int) - first).max() > 0
    assert main(base) == 1
    assert "pass --control-image 1 time(s)" in capsys.readouterr().err
    plain = ["generate", str(compiled("sd15", "torch").root), "--prompt", "a fox", "--out", str(out)]
    assert main(plain + ["--control-image", str(control)]) == 1
    assert "this artifact has no ControlNet; compile one with --controlnet" in capsys.readouterr().err


def test_served_rows_take_control_images(artifact):
    """The `pipeline` model's `control_image` input (uint8 [rows, nets, H, W, 3]; with `image`: ControlNet
    image-to-image) gives the Python call's images row by row; another control image gives other images."""
    from sdcompiler.serving import request_rows, serve_rows

    pipe = artifact("sd15", (0, 1), recipe="fuse-qkv")
    controls = [np.asarray(_control_image(s)) for s in (0, 1, 2)]
    start = (np.asarray(_control_image(5, kind="np"))[0] ** 0.5 * 255).round().astype(np.uint8)
    for img2img in (False, True):
        inputs = {
            "prompt": np.array([[b"a fox"], [b"a fox"]], dtype=object),
            "num_inference_steps": np.array([[3], [3]], dtype=np.int32),
            "control_image": np.stack([np.stack(controls[:2]), np.stack([controls[2], controls[1]])]),
        }
        if img2img:
            inputs["image"] = np.stack([start, start])
        (served,) = serve_rows(pipe, [request_rows(inputs.get)])
        assert not isinstance(served, Exception), repr(served)
        for row, nets in enumerate([controls[:2], [controls[2], controls[1]]]):
            floats = [n.astype(np.float32)[None] / 255.0 for n in nets]
            call = dict(prompt="a fox", num_inference_steps=3, output_type="np", generator=[_seed()])
            if img2img:
                call |= dict(image=start.astype(np.float32)[None] / 255.0, control_image=floats)
            else:
                call |= dict(image=floats)
            expected = (pipe(**call).images * 255).round().astype(np.uint8)
            assert np.abs(served[row].astype(int) - expected.astype(int)).max() <= 1  # batched rounding (measured 0-1)
        assert np.abs(served[0].astype(int) - served[1].astype(int)).max() > 10, img2img
