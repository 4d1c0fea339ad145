"""Tests for `sdcompiler.loading`: diffusers folders, single files, pickles, the HF cache and every refusal.

Single-file checkpoints are built from tiny diffusers pipelines by
`to_original_layout`, the inverse of diffusers' own key mapping
(`diffusers.loaders.single_file_utils`), so a round trip through
`load_checkpoint` must give back the same weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdcompiler.errors import CheckpointError
from sdcompiler.loading import checkpoint_sha256, load_checkpoint
from sdcompiler.testing import make_checkpoint

ARCHS = ("sd15", "sd21", "sdxl")

# --- original-layout (CompVis / SGM) state dicts from diffusers pipelines -------------------------------------

_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
_VAE_SHORTCUT = [("conv_shortcut", "nin_shortcut")]
_VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
_OPEN_CLIP = [
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
    ("self_attn.out_proj", "attn.out_proj"),
]


def _rename(rest: str, pairs) -> str:
    """Rename the module part of `module.param` by the (diffusers, original) pairs."""
    module, _, param = rest.rpartition(".")
    return next((f"{old}.{param}" for new, old in pairs if module == new), rest)


def _unet_to_ldm(state: dict, config) -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as MAP

    n = config["layers_per_block"] + 1  # original blocks per stage: the layers plus a down/upsampler slot
    direct = {**MAP["unet"]["layers"], **MAP["unet"]["addition_embed_type"]}
    up_with_attention = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    rules = [
        (
            r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda b, i, r: f"input_blocks.{1 + b * n + i}.0.{_rename(r, _RESNET)}",
        ),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda b, i, r: f"input_blocks.{1 + b * n + i}.1.{r}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", lambda b, r: f"input_blocks.{b * n + n}.0.op.{r}"),
        (r"mid_block\.resnets\.(\d+)\.(.+)", lambda i, r: f"middle_block.{2 * i}.{_rename(r, _RESNET)}"),
        (r"mid_block\.attentions\.0\.(.+)", lambda r: f"middle_block.1.{r}"),
        (
            r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda b, i, r: f"output_blocks.{b * n + i}.0.{_rename(r, _RESNET)}",
        ),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda b, i, r: f"output_blocks.{b * n + i}.1.{r}"),
        (
            r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
            lambda b, r: f"output_blocks.{b * n + n - 1}.{2 if b in up_with_attention else 1}.conv.{r}",
        ),
    ]
    return {"model.diffusion_model." + (direct.get(k) or _apply(rules, k)): v for k, v in state.items()}


def _vae_to_ldm(state: dict, config) -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as MAP

    last = len(config["up_block_types"]) - 1  # the original decoder numbers its stages bottom-up
    rules = [
        (
            r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)",
            lambda part, i, r: f"{part}.mid.block_{i + 1}.{_rename(r, _VAE_SHORTCUT)}",
        ),
        (
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)",
            lambda part, r: f"{part}.mid.attn_1.{_rename(r, _VAE_ATTENTION)}",
        ),
        (
            r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda b, i, r: f"encoder.down.{b}.block.{i}.{_rename(r, _VAE_SHORTCUT)}",
        ),
        (
            r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
            lambda b, r: f"encoder.down.{b}.downsample.conv.{r}",
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda b, i, r: f"decoder.up.{last - b}.block.{i}.{_rename(r, _VAE_SHORTCUT)}",
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
            lambda b, r: f"decoder.up.{last - b}.upsample.conv.{r}",
        ),
    ]
    out = {}
    for key, value in state.items():
        if ".mid_block.attentions." in key and value.ndim == 2:  # original attention projections are 1x1 convs
            value = value[:, :, None, None]
        out["first_stage_model." + (MAP["vae"].get(key) or _apply(rules, key))] = value
    return out


def _open_clip_to_ldm(state: dict, prefix: str) -> dict:
    out = {}
    for key, value in state.items():
        if m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            if m[2] == "q":  # OpenCLIP keeps q, k, v in one in_proj matrix
                qkv = [state[key.replace("q_proj", f"{p}_proj")] for p in "qkv"]
                out[f"{prefix}transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"] = torch.cat(qkv)
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key):
            out[f"{prefix}transformer.resblocks.{m[1]}.{_rename(m[2], _OPEN_CLIP)}"] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        else:
            out[
                prefix
                + {
                    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                    "text_model.embeddings.position_embedding.weight": "positional_embedding",
                    "text_model.final_layer_norm.weight": "ln_final.weight",
                    "text_model.final_layer_norm.bias": "ln_final.bias",
                }[key]
            ] = value
    return out


def _apply(rules, key: str) -> str:
    for pattern, build in rules:
        if m := re.fullmatch(pattern, key):
            return build(*(int(g) if g.isdigit() else g for g in m.groups()))
    raise KeyError(f"no original-layout name for {key}")


def to_original_layout(pipe, arch: str) -> dict[str, torch.Tensor]:
    """The single-file state dict a CompVis (SD) or SGM (SDXL) checkpoint of `pipe` would hold."""
    state = _unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config) | _vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)
    text = pipe.text_encoder.state_dict()
    if arch == "sd15":
        state |= {"cond_stage_model.transformer." + k: v for k, v in text.items()}
    elif arch == "sd21":
        state |= _open_clip_to_ldm(text, "cond_stage_model.model.")
    else:
        state |= {"conditioner.embedders.0.transformer." + k: v for k, v in text.items()}
        state |= _open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model.")
    return {k: v.contiguous() for k, v in state.items()}


# --- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_checkpoint(root / arch, arch, "tiny") for arch in ARCHS}


@pytest.fixture(scope="session")
def single_file(tmp_path_factory, tiny):
    """arch -> (original-layout .safetensors, weightless config folder, the diffusers folder it came from)."""
    import diffusers
    import transformers

    root, built = tmp_path_factory.mktemp("single"), {}

    def build(arch: str):
        if arch not in built:
            folder = tiny[arch]
            if arch == "sdxl":
                # diffusers tells SDXL's two text encoders apart by width; the tiny ones are both 32 wide,
                # so give the second its own width (and the U-Net the matching context width 32 + 48).
                folder = make_checkpoint(root / "sdxl-folder", "sdxl", "tiny", unet={"cross_attention_dim": 80})
                pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
                config = pipe.text_encoder_2.config
                config.hidden_size, config.intermediate_size = 48, 96
                torch.manual_seed(1)
                pipe.text_encoder_2 = transformers.CLIPTextModelWithProjection(config).eval()
                shutil.rmtree(folder)
                pipe.save_pretrained(folder)
            pipe = load_checkpoint(folder).pipeline
            file = root / f"{arch}.safetensors"
            save_file(to_original_layout(pipe, arch), file)
            configs = root / f"{arch}-configs"  # no weights: from_single_file would use them for missing parts
            shutil.copytree(folder, configs, ignore=shutil.ignore_patterns("*.safetensors"))
            built[arch] = file, configs, folder
        return built[arch]

    return build


def _error(source, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(source, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def _unet_outputs(pipe) -> torch.Tensor:
    unet = pipe.unet
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra = {
            "added_cond_kwargs": {
                "text_embeds": torch.randn(1, pooled, generator=generator),
                "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]]),
            }
        }
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), context, **extra).sample


# --- diffusers folders ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_diffusers_folder_arch_and_source(tiny, arch):
    loaded = load_checkpoint(tiny[arch])
    assert loaded.arch.name == arch
    assert type(loaded.pipeline).__name__ == loaded.arch.pipeline_class
    assert loaded.source == {
        "path": str(tiny[arch].resolve()),
        "kind": "diffusers",
        "sha256": checkpoint_sha256(tiny[arch]),
        "unet_dtype": "fp32",
    }
    params = list(loaded.pipeline.unet.parameters())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params)
    assert not loaded.pipeline.unet.training and not loaded.pipeline.text_encoder.training
    if arch != "sdxl":
        assert loaded.pipeline.safety_checker is None
    # SD 2.x's v-prediction lives in the scheduler config and must survive loading.
    expected = "v_prediction" if arch == "sd21" else "epsilon"
    assert loaded.pipeline.scheduler.config.prediction_type == expected


def test_prediction_type_override(tiny):
    assert (
        load_checkpoint(tiny["sd15"], prediction_type="v_prediction").pipeline.scheduler.config.prediction_type
        == "v_prediction"
    )
    assert (
        load_checkpoint(tiny["sd21"], prediction_type="epsilon").pipeline.scheduler.config.prediction_type == "epsilon"
    )
    assert "unknown prediction_type" in _error(tiny["sd15"], prediction_type="x0")


def test_folder_listing_safety_checker_loads_without_it(tiny, tmp_path):
    folder = shutil.copytree(tiny["sd15"], tmp_path / "sd15")
    index = json.loads((folder / "model_index.json").read_text())
    index |= {
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "requires_safety_checker": True,
    }
    (folder / "model_index.json").write_text(json.dumps(index))  # listed, but its folders are absent
    assert load_checkpoint(folder).pipeline.safety_checker is None


def test_pickle_only_folder(tiny, tmp_path):
    import diffusers

    folder = tmp_path / "bin"
    diffusers.StableDiffusionPipeline.from_pretrained(tiny["sd15"]).save_pretrained(folder, safe_serialization=False)
    message = _error(folder)
    assert "holds only pickle weights" in message and "unet/diffusion_pytorch_model.bin" in message
    assert "allow_pickle=True" in message and "--allow-pickle" in message
    assert load_checkpoint(folder, allow_pickle=True).arch.name == "sd15"


def test_unsupported_unet_config(tiny, tmp_path):
    folder = shutil.copytree(tiny["sd15"], tmp_path / "depth")
    config = json.loads((folder / "unet/config.json").read_text()) | {"in_channels": 5}  # depth-to-image
    (folder / "unet/config.json").write_text(json.dumps(config))
    assert "unsupported architecture" in _error(folder)


def test_broken_folders(tiny, tmp_path):
    broken = shutil.copytree(tiny["sd15"], tmp_path / "broken")
    (broken / "unet/config.json").write_text("{not json")
    assert "unreadable unet/config.json" in _error(broken)
    missing = shutil.copytree(tiny["sd15"], tmp_path / "missing")
    (missing / "vae/diffusion_pytorch_model.safetensors").unlink()
    message = _error(missing)
    assert message.startswith(f"{missing}/vae has no weight file") and "diffusion_pytorch_model" in message


# --- single files ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_single_file_round_trip(single_file, arch):
    file, configs, folder = single_file(arch)
    loaded = load_checkpoint(file, config=configs)
    reference = load_checkpoint(folder).pipeline
    assert loaded.arch.name == arch
    assert loaded.source == {
        "path": str(file.resolve()),
        "kind": "single_file",
        "sha256": checkpoint_sha256(file),
        "unet_dtype": "fp32",  # read from the safetensors header
    }
    torch.testing.assert_close(_unet_outputs(loaded.pipeline), _unet_outputs(reference), atol=1e-5, rtol=0)
    for name in ("vae", "text_encoder", "text_encoder_2")[: 3 if arch == "sdxl" else 2]:
        ours, theirs = getattr(loaded.pipeline, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_single_file_defaults_to_shipped_full_size_configs(single_file):
    file, _, _ = single_file("sd15")
    message = _error(file)  # tiny weights against the real SD1.5 configs: shapes cannot fit
    assert message.startswith(f"could not load {file}:") and "768" in message


def test_single_file_missing_tensor_is_caught(single_file, tmp_path):
    from safetensors.torch import load_file

    file, configs, _ = single_file("sd15")
    state = load_file(file)
    del state["model.diffusion_model.out.2.bias"]
    save_file(state, tmp_path / "partial.safetensors")
    # The U-Net fails inside diffusers (moving a meta tensor), a text encoder would reach our own check.
    assert "lacks weights" in _error(tmp_path / "partial.safetensors", config=configs)
    del state["cond_stage_model.transformer.text_model.final_layer_norm.bias"]
    state["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    save_file(state, tmp_path / "partial.safetensors")
    message = _error(tmp_path / "partial.safetensors", config=configs)
    assert "lacks weights for text_encoder" in message and "final_layer_norm.bias" in message


def test_truncated_and_corrupt_safetensors(single_file, tmp_path):
    file, _, _ = single_file("sd15")
    data = file.read_bytes()
    (tmp_path / "half.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.safetensors").write_bytes(os.urandom(4096))
    for name in ("half", "noise"):
        message = _error(tmp_path / f"{name}.safetensors")
        assert "is truncated or corrupt" in message and "re-download it" in message


def test_single_file_without_unet(tmp_path):
    save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(2, 2)}, tmp_path / "vae.safetensors")
    message = _error(tmp_path / "vae.safetensors")
    assert "unsupported architecture" in message and "model.diffusion_model" in message


def test_pickle_refused_then_accepted(single_file, tmp_path):
    from safetensors.torch import load_file

    file, configs, folder = single_file("sd15")
    ckpt = tmp_path / "model.ckpt"
    # Lightning-style: nested state_dict plus a non-tensor object that weights_only=True would reject.
    torch.save({"state_dict": load_file(file), "hparams": argparse.Namespace(lr=1e-4), "global_step": 3}, ckpt)
    message = _error(ckpt)
    assert "is a pickle checkpoint, which can run arbitrary code" in message
    assert "allow_pickle=True (CLI: --allow-pickle)" in message
    loaded = load_checkpoint(ckpt, allow_pickle=True, config=configs)
    assert loaded.arch.name == "sd15" and loaded.source["kind"] == "single_file"
    torch.testing.assert_close(
        _unet_outputs(loaded.pipeline), _unet_outputs(load_checkpoint(folder).pipeline), atol=1e-5, rtol=0
    )


def test_unsupported_suffix_and_config_misuse(tiny, tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x")
    message = _error(tmp_path / "model.onnx")
    assert "unsupported suffix '.onnx'" in message and ".safetensors" in message
    assert "single-file checkpoints only" in _error(tiny["sd15"], config=tiny["sd15"])


# --- missing paths and the Hugging Face cache ------------------------------------------------------------------


def test_missing_paths(tmp_path):
    for source in (tmp_path / "absent", "./absent", "owner/name/extra", "owner/model.safetensors"):
        assert "does not exist: pass a diffusers folder" in _error(source), source
    assert "is not a diffusers pipeline folder (no model_index.json)" in _error(tmp_path)


def _fake_hub_cache(root: Path, repo_id: str, source: Path) -> Path:
    """The layout huggingface_hub writes: content-addressed blobs, symlinked from a snapshot named by commit."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        blob = repo / "blobs" / checkpoint_sha256(file)
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link = repo / "snapshots" / commit / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_hf_cache_hit_and_miss(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    cache = tmp_path / "hub"
    snapshot = _fake_hub_cache(cache, "someone/tiny-sd15", tiny["sd15"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import time
    assert Path(huggingface_hub.snapshot_download("someone/tiny-sd15", local_files_only=True)) == snapshot
    loaded = load_checkpoint("someone/tiny-sd15")
    assert loaded.arch.name == "sd15"
    # The folder hash follows the symlinks and ignores location: same content, same hash.
    assert loaded.source == {
        "path": "someone/tiny-sd15",
        "kind": "hf_cache",
        "sha256": checkpoint_sha256(tiny["sd15"]),
        "unet_dtype": "fp32",
    }
    message = _error("someone/absent")
    assert "neither a local path nor a Hugging Face id in the local cache (no network here)" in message


# --- content hash ---------------------------------------------------------------------------------------------------


def test_checkpoint_sha256(tiny, tmp_path):
    folder = shutil.copytree(tiny["sd15"], tmp_path / "copy")
    digest = checkpoint_sha256(folder)
    assert digest == checkpoint_sha256(tiny["sd15"]) == checkpoint_sha256(folder)
    (folder / ".complete").write_text("ignored")  # hidden files are not content
    assert checkpoint_sha256(folder) == digest
    weights = folder / "unet/diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    assert checkpoint_sha256(weights) == hashlib.sha256(data).hexdigest()
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert checkpoint_sha256(folder) != digest
