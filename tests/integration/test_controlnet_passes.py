"""Passes that keep the U-Net's down / mid layout, compiled with a ControlNet (issue 19, item 2): GRI attention,
INT8 (modelopt, real INT8 layers on the torch target), QuEST W4A4, CFG distillation, LCM distillation, the
LCM scheduler swap, a merged LoRA, a tiny VAE (`swap_vae`), and DeepCache (`feature_cache`: the reference is
diffusers' pipeline with cached deep features swapped in by hooks on its U-Net).

Oracle: diffusers' own `StableDiffusionControlNetPipeline` built from the artifact's modules as loaded (the
transformed U-Net, the stored ControlNet, the artifact's scheduler): the compiled pipeline must feed the net's
residuals into the transformed U-Net exactly as diffusers does (images within 1e-5), and the control image must
move the images (a pass whose U-Net dropped the residuals would agree with nothing but itself). Each record says
the pass keeps the layout; the ControlNet itself stays float (ptq's and quest_w4a4's `quantize_controlnets`,
which quantize it too, are tested in test_ptq_controlnet.py and test_quest_controlnet.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdcompiler import compile_pipeline
from sdcompiler.testing import make_controlnet

TOLERANCE = 1e-5
TRAINING = {"steps": 2, "batch_size": 2, "num_prompts": 2, "held_out_prompts": 1, "teacher_steps": 2}
RECIPES = {
    "gri": ["gri"],
    "int8": [{"pass": "ptq", "precision": "int8", "calib_prompts": 1, "calib_steps": 2, "resolution": 64}],
    "quest-w4a4": [
        {
            "pass": "quest_w4a4",
            "calib_prompts": 1,
            "held_out_prompts": 1,
            "calib_steps": 2,
            "resolution": 64,
            "finetune": False,
        }
    ],
    "cfg-distill": [{"pass": "distill_cfg", **TRAINING, "image_steps": 2}],
    # a guidance embedding: the U-Net takes `timestep_cond` (the loop's other U-Net call) next to the residuals
    "cfg-distill-range": [{"pass": "distill_cfg", **TRAINING, "image_steps": 2, "guidance_range": [2.0, 8.0]}],
    "lcm": [{"pass": "distill_steps", **TRAINING, "reference_steps": 2}],
    "lcm-scheduler": ["lcm-scheduler"],  # set_scheduler: the nets run under the artifact's LCMScheduler
    # a LoRA for the U-Net and the text encoder merged into them; the ControlNet stays as given
    "merge-lora": [{"pass": "merge_lora", "path": "{lora}", "scale": 0.7}],
    "taesd": [{"preset": "taesd", "path": "{taesd}"}],  # swap_vae: a tiny VAE decodes what the nets steered
}
PASS_NAMES = {
    "gri": "swap_attention",
    "int8": "ptq",
    "quest-w4a4": "quest_w4a4",
    "cfg-distill": "distill_cfg",
    "cfg-distill-range": "distill_cfg",
    "lcm": "distill_steps",
    "lcm-scheduler": "set_scheduler",
    "merge-lora": "merge_lora",
    "taesd": "swap_vae",
}


@pytest.fixture(scope="module")
def controlnet(tiny_checkpoint, tmp_path_factory):
    return make_controlnet(tmp_path_factory.mktemp("cn") / "net", tiny_checkpoint("sd15"), seed=0)


@pytest.fixture(scope="module")
def recipe_files(tiny_checkpoint, tmp_path_factory):
    """name -> the file a recipe names (`{lora}`: a LoRA for the U-Net and text encoder; `{taesd}`: a tiny VAE
    folder), each made on first use."""
    made = {}

    def get(name: str) -> str:
        if name not in made:
            folder = tmp_path_factory.mktemp(name)
            if name == "lora":
                from lora_files import make_full_lora

                made[name] = make_full_lora(tiny_checkpoint("sd15"), folder, seed=1)
            else:
                from diffusers import AutoencoderTiny

                torch.manual_seed(0)
                AutoencoderTiny(
                    encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4
                ).save_pretrained(folder)
                made[name] = folder
        return str(made[name])

    return get


def _with_files(recipe: list, files) -> list:
    """`recipe` with its `{lora}` / `{taesd}` paths filled in."""
    fill = lambda value: files(value[1:-1]) if value in ("{lora}", "{taesd}") else value  # noqa: E731
    return [{k: fill(v) for k, v in item.items()} if isinstance(item, dict) else item for item in recipe]


def _control_image(seed: int) -> np.ndarray:
    pixels = np.random.default_rng(seed).random((1, 64, 64, 3)).astype(np.float32)
    pixels[:, :32, : 16 + 8 * seed] = 1.0
    return pixels


def _diffusers_on_the_artifact(pipe):
    """diffusers' ControlNet pipeline on the compiled pipeline's own torch modules and scheduler."""
    import diffusers

    components = pipe.components.pipeline.components
    parts = {k: v for k, v in components.items() if k in ("vae", "text_encoder", "tokenizer", "unet")}
    net = pipe.components.modules["controlnet"]
    reference = diffusers.StableDiffusionControlNetPipeline(
        **parts,
        scheduler=pipe.components.scheduler_factory(),
        controlnet=net,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    return reference


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_a_layout_keeping_pass_runs_with_a_controlnet_as_diffusers_does(
    name, tiny_checkpoint, controlnet, recipe_files, tmp_path, monkeypatch
):
    # the kernels' torch paths on both sides (under TRITON_INTERPRET the GRI / low-precision kernels would run
    # interpreted for minutes; they have their own tests against these references)
    monkeypatch.setenv("SDCOMPILER_DISABLE_TRITON", "1")
    pipe = compile_pipeline(
        tiny_checkpoint("sd15"),
        recipe=_with_files(RECIPES[name], recipe_files),
        target="torch",
        output_dir=tmp_path / "out",
        device="cpu",
        controlnet=controlnet,
        show_progress=False,
    )
    record = pipe.manifest["passes"][-1]
    assert (record["name"], record["controlnet"]) == (PASS_NAMES[name], "keeps_layout")
    defaults = pipe.manifest.get("defaults", {})
    call = dict(
        prompt=["a red cube on a table", "a fox"],
        num_inference_steps=defaults.get("num_inference_steps", 3),
        guidance_scale=defaults.get("guidance_scale", 5.0),
        output_type="np",
        height=64,
        width=64,
        controlnet_conditioning_scale=0.8,
    )
    assert_matches_diffusers_and_steered(
        pipe, call, (_control_image(0), _control_image(1)), f"{name} with a ControlNet"
    )


def assert_matches_diffusers_and_steered(pipe, call: dict, images: tuple, label: str) -> None:
    """The compiled ControlNet pipeline's images for the first control image equal those of diffusers' pipeline on
    the artifact's own modules (max abs error below TOLERANCE), and the second control image moves them."""
    first, second = images
    got = pipe(**call, image=first, generator=torch.Generator().manual_seed(0)).images
    reference = _diffusers_on_the_artifact(pipe)
    expected = reference(**call, image=first, generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(got).all() and np.asarray(expected).std() > 0.01
    error = float(np.abs(np.asarray(got, np.float64) - np.asarray(expected, np.float64)).max())
    print(f"{label}: max abs error vs diffusers {error:.2e}")
    assert error < TOLERANCE
    other = pipe(**call, image=second, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(other - got).max() > 1e-3, "the control image changed nothing"


def synthetic_control(seed: int) -> np.ndarray:
    """One 64 px synthetic edge map (`synthetic_control_images`) as a (1, H, W, 3) array, the way users pass it."""
    from sdcompiler.passes.teacher_data import synthetic_control_images

    return synthetic_control_images(1, 64, np.random.default_rng(seed + 10)).permute(0, 2, 3, 1).numpy()


def run_pass_with_controlnet(pass_name: str, settings: dict, checkpoint, controlnet, cache_dir) -> tuple:
    """Run pass `pass_name` (config `settings`) as compile_pipeline runs it with one ControlNet, on a pipeline and
    net loaded here: (pipeline, the net as the pass left it, the context, the pass's metrics, float U-Net copy,
    float net copy)."""
    import copy
    import json

    from sdcompiler.loading import load_checkpoint, load_controlnet
    from sdcompiler.passes import PassContext, get_pass

    pipe = load_checkpoint(checkpoint).pipeline
    net, source = load_controlnet(controlnet)
    pass_ = get_pass(pass_name)
    config = pass_.config_class.from_dict(settings, owner=pass_name)
    ctx = PassContext(
        arch="sd15",
        macs_resolution=(64, 64),
        cache_dir=cache_dir,
        show_progress=False,
        target="torch",
        controlnets={"controlnet": net},
        controlnets_key=json.dumps([source["sha256"]]),
    )
    float_unet, float_net = copy.deepcopy(pipe.unet).eval(), copy.deepcopy(net).eval()
    pass_.requires(pipe, config, ctx)
    metrics = pass_.run(pipe, config, ctx)
    return pipe, net, ctx, metrics, float_unet, float_net


# --- deepcache (feature_cache) with a ControlNet ---------------------------------------------------------------

# the pipeline call of the ControlNet comparisons (deepcache's here, the quantized nets' elsewhere)
DEEPCACHE = [{"pass": "feature_cache", "interval": 3, "branch": 0}]
CONTROL_CALL = dict(
    prompt=["a red cube on a table", "a fox"],
    num_inference_steps=3,
    guidance_scale=5.0,
    output_type="np",
    height=64,
    width=64,
    controlnet_conditioning_scale=0.8,
)


@pytest.fixture(scope="module")
def deepcache_artifact(tiny_checkpoint, controlnet, tmp_path_factory):
    """target -> the deepcache artifact compiled with the ControlNet, once per target."""
    built = {}

    def build(target):
        if target not in built:
            built[target] = compile_pipeline(
                tiny_checkpoint("sd15"),
                recipe=DEEPCACHE,
                target=target,
                target_options={"vae_encoder": False} if target == "onnx" else None,
                output_dir=tmp_path_factory.mktemp("deepcache") / target,
                device="cpu",
                controlnet=controlnet,
                show_progress=False,
            )
        return built[target]

    return build


def _diffusers_deepcache(pipe, plan, branch):
    """diffusers' ControlNet pipeline on the artifact's modules, with DeepCache made of hooks on its own U-Net: a
    full step runs `unet(...)` whole (the net's residuals on every skip and the mid block) and keeps the input of
    up block n-1-branch; a cached step runs `unet(...)` with that input replaced by the kept one, so only the
    shallow blocks' outputs (with their skips' residuals: the net ran on this step too) reach the image."""
    reference = _diffusers_on_the_artifact(pipe)
    unet = reference.unet
    state = {"step": -1, "deep": None}

    def count(module, args):
        state["step"] += 1

    def swap(module, args, kwargs):
        if plan[state["step"]]:
            state["deep"] = kwargs["hidden_states"].clone()
            return None
        return args, {**kwargs, "hidden_states": state["deep"]}

    hooks = [
        unet.register_forward_pre_hook(count),
        unet.up_blocks[len(unet.up_blocks) - 1 - branch].register_forward_pre_hook(swap, with_kwargs=True),
    ]
    return reference, hooks


@pytest.mark.slow
def test_deepcache_with_a_controlnet_runs_as_diffusers_with_cached_deep_features(deepcache_artifact, monkeypatch):
    """Torch target vs the hand-written DeepCache above (which runs the whole net on every step; the target stops
    it after the down block its shallow skips come from on cached steps); the control residuals of the shallow
    skips move the images on cached steps (without them the images differ), so the comparison sees a shallow
    step that drops them."""
    monkeypatch.setenv("SDCOMPILER_DISABLE_TRITON", "1")
    pipe = deepcache_artifact("torch")
    record = pipe.manifest["passes"][-1]
    assert (record["name"], record["controlnet"]) == ("feature_cache", "keeps_layout")
    scheduler = pipe.components.scheduler_factory()
    scheduler.set_timesteps(CONTROL_CALL["num_inference_steps"])
    plan = pipe.components.feature_cache.plan(len(scheduler.timesteps))  # one U-Net call per timestep
    assert plan[0] and not all(plan)
    image = _control_image(0)
    net_calls = {"down": 0, "mid": 0}  # cached steps stop the net after the down block their skips come from
    net = pipe.components.modules["controlnet"]
    hooks = [
        module.register_forward_hook(lambda *a, part=part: net_calls.__setitem__(part, net_calls[part] + 1))
        for part, module in (("down", net.down_blocks[0]), ("mid", net.mid_block))
    ]
    try:
        got = pipe(**CONTROL_CALL, image=image, generator=torch.Generator().manual_seed(0)).images
    finally:
        for hook in hooks:
            hook.remove()
    assert net_calls == {"down": len(plan), "mid": sum(plan)}
    reference, hooks = _diffusers_deepcache(pipe, plan, branch=0)
    try:
        expected = reference(**CONTROL_CALL, image=image, generator=torch.Generator().manual_seed(0)).images
    finally:
        for hook in hooks:
            hook.remove()
    assert np.isfinite(got).all() and np.asarray(expected).std() > 0.01
    error = float(np.abs(np.asarray(got, np.float64) - np.asarray(expected, np.float64)).max())
    print(f"deepcache with a ControlNet: max abs error vs diffusers with cached deep features {error:.2e}")
    assert error < TOLERANCE
    uncached = pipe(**CONTROL_CALL, image=image, feature_cache=False, generator=torch.Generator().manual_seed(0))
    assert np.abs(uncached.images - got).max() > 1e-4, "the shallow steps ran the whole U-Net"

    cache = pipe.components.feature_cache
    shallow = cache.shallow
    monkeypatch.setattr(cache, "shallow", lambda *a, down_residuals=None, **k: shallow(*a, **k))
    dropped = pipe(**CONTROL_CALL, image=image, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(dropped - got).max() > 1e-3, "the shallow skips' control residuals changed nothing"


@pytest.mark.slow
def test_deepcache_with_a_controlnet_on_onnx_matches_torch(deepcache_artifact, monkeypatch):
    """The onnx target's refresh and shallow graphs take the residuals (the shallow graph those of its skips), and
    the cached steps run the ControlNet's graph cut down to them."""
    import onnx

    monkeypatch.setenv("SDCOMPILER_DISABLE_TRITON", "1")
    pipe = deepcache_artifact("onnx")
    shallow = onnx.load(str(pipe.root / "unet_shallow" / "model.onnx"), load_external_data=False)
    residuals = [i.name for i in shallow.graph.input if i.name.endswith("_additional_residual")]
    assert residuals == [f"down_block_{i}_additional_residual" for i in range(3)]  # conv_in's + 2 resnets'
    # the net's graph cut down to those residuals, which the cached steps run
    whole = onnx.load(str(pipe.root / "controlnet" / "model.onnx"), load_external_data=False)
    cut = onnx.load(str(pipe.root / "controlnet" / "shallow.onnx"), load_external_data=False)
    assert [o.name for o in cut.graph.output] == residuals
    assert len(cut.graph.node) < len(whole.graph.node) / 2
    assert pipe.components.controlnets.shallow_residuals is not None
    image = _control_image(0)
    got = pipe(**CONTROL_CALL, image=image, generator=torch.Generator().manual_seed(0)).images
    expected = deepcache_artifact("torch")(
        **CONTROL_CALL, image=image, generator=torch.Generator().manual_seed(0)
    ).images
    error = float(np.abs(np.asarray(got, np.float64) - np.asarray(expected, np.float64)).max())
    print(f"deepcache with a ControlNet, onnx vs torch: max abs error {error:.2e}")
    assert error < 1e-4
