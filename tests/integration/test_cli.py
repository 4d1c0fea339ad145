"""The `sdcompiler` CLI: exit codes, one-line errors, and the files each command writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdcompiler.cli import main
from sdcompiler.testing import make_checkpoint


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def checkpoint(workdir) -> Path:
    return make_checkpoint(workdir / "ckpt", "sd15", "tiny", seed=0)


@pytest.fixture(scope="module")
def artifact(workdir, checkpoint) -> Path:
    out = workdir / "artifact"
    assert (
        main(["compile", str(checkpoint), "--recipe", "fuse-qkv", "--target", "onnx", "--out", str(out), "--quiet"])
        == 0
    )
    return out


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: "), err
    assert "\n" not in err, err
    return err


def test_compile_writes_artifact_with_manifest(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["target"] == "onnx"
    assert [p["name"] for p in manifest["passes"]] == ["fuse_qkv"]
    assert (artifact / "unet" / "model.onnx").is_file()


def test_generate_writes_png(artifact, workdir, capsys):
    out = workdir / "img.png"
    rc = main(
        [
            "generate",
            str(artifact),
            "--prompt",
            "a red cube",
            "--steps",
            "2",
            "--seed",
            "1",
            "--height",
            "64",
            "--width",
            "96",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    with Image.open(out) as image:
        assert image.size == (96, 64)
    assert "wrote" in capsys.readouterr().out


def test_generate_several_images_get_suffixes(artifact, workdir):
    out = workdir / "many.png"
    assert (
        main(
            ["generate", str(artifact), "--prompt", "a", "--prompt", "b", "--steps", "1", "--out", str(out), "--quiet"]
        )
        == 0
    )
    assert (workdir / "many-0.png").is_file() and (workdir / "many-1.png").is_file()


def test_inspect_artifact_and_checkpoint(artifact, checkpoint, capsys):
    assert main(["inspect", str(artifact)]) == 0
    text = capsys.readouterr().out
    assert "fuse_qkv" in text and "onnx" in text
    assert main(["inspect", str(checkpoint), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == "sd15" and info["kind"] == "diffusers"
    assert info["unet_params"] == 2446788 and info["unet_macs"] > 0


def test_missing_checkpoint_is_exit_1_and_leaves_nothing(workdir, capsys):
    out = workdir / "never"
    assert main(["compile", str(workdir / "nope"), "--out", str(out)]) == 1
    assert "does not exist" in _one_line_error(capsys)
    assert not out.exists()
    assert not list(workdir.glob(".never.partial-*"))


def test_unknown_preset_is_exit_1(checkpoint, workdir, capsys):
    assert main(["compile", str(checkpoint), "--recipe", "no-such-preset", "--out", str(workdir / "x")]) == 1
    err = _one_line_error(capsys)
    assert "unknown preset 'no-such-preset'" in err and "fuse-qkv" in err


def test_pickle_checkpoint_refused_without_flag(workdir, capsys):
    ckpt = workdir / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    assert main(["compile", str(ckpt), "--out", str(workdir / "p")]) == 1
    assert "allow-pickle" in _one_line_error(capsys) or "allow_pickle" in capsys.readouterr().err


def test_non_artifact_output_folder_is_refused_untouched(checkpoint, workdir, capsys):
    out = workdir / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["compile", str(checkpoint), "--out", str(out), "--quiet"]) == 1
    assert "not empty" in _one_line_error(capsys)
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_bad_target_option_is_exit_1(checkpoint, workdir, capsys):
    assert main(["compile", str(checkpoint), "--out", str(workdir / "o"), "--option", "colour=blue"]) == 1
    assert "unknown key(s) colour" in _one_line_error(capsys)


def test_malformed_command_line_is_exit_2():
    with pytest.raises(SystemExit) as exc:
        main(["compile"])
    assert exc.value.code == 2


def test_python_dash_m_entry_point_reports_one_line(workdir):
    env = dict(os.environ, SDCOMPILER_QUIET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "sdcompiler", "generate", str(workdir / "missing"), "--prompt", "x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0], proc.stderr


def test_demo_runs_and_reports(workdir, checkpoint, capsys):
    out = workdir / "demo"
    assert main(["demo", "--checkpoint", str(checkpoint), "--out", str(out), "--steps", "2", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "PSNR" in text and "U-Net MACs" in text
    with Image.open(out / "demo.png") as image:
        pixels = np.asarray(image)
    assert pixels.shape == (128, 128, 3) and pixels.std() > 1


def test_fp16_onnx_precision_stays_close_to_fp32(checkpoint, workdir):
    from sdcompiler import compile_pipeline
    from sdcompiler.loading import load_checkpoint

    pipe = compile_pipeline(
        checkpoint, "none", "onnx", workdir / "fp16", target_options={"precision": "fp16"}, show_progress=False
    )
    import onnx

    unet = onnx.load(str(workdir / "fp16" / "unet" / "model.onnx"))
    assert unet.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    vae = onnx.load(str(workdir / "fp16" / "vae_decoder" / "model.onnx"))
    assert vae.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # VAE stays fp32
    kwargs = dict(num_inference_steps=2, output_type="np")
    got = pipe("a cube", generator=torch.Generator().manual_seed(0), **kwargs).images
    reference = load_checkpoint(checkpoint).pipeline
    reference.set_progress_bar_config(disable=True)
    want = reference("a cube", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert 0 < np.abs(got - want).max() < 2e-2


def test_inline_recipe_options(checkpoint, workdir, capsys):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    taesd = workdir / "taesd"
    AutoencoderTiny(encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4).save_pretrained(taesd)
    out = workdir / "inline"
    recipe = f"fuse-qkv:cross_attention=false,self_attention=true,taesd:path={taesd}"
    assert (
        main(["compile", str(checkpoint), "--recipe", recipe, "--target", "torch", "--out", str(out), "--quiet"]) == 0
    )
    passes = json.loads((out / "manifest.json").read_text())["recipe"]["passes"]
    assert [(p["pass"], p.get("cross_attention"), p.get("path")) for p in passes] == [
        ("fuse_qkv", False, None),
        ("swap_vae", None, str(taesd)),
    ]
    capsys.readouterr()
    assert main(["compile", str(checkpoint), "--recipe", "fuse-qkv,steps=3", "--out", str(workdir / "bad")]) == 1
    assert "follows no NAME:KEY=VALUE item" in _one_line_error(capsys)
    assert not (workdir / "bad").exists()


@pytest.mark.parametrize("argv", [["--help"], ["compile", "--help"]])
def test_help_lists_presets_and_targets(argv, capsys):
    from sdcompiler.recipe import available_presets

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    text = capsys.readouterr().out
    lines = text.split("presets (", 1)[1].splitlines()
    for name in available_presets():  # one line each, with a summary of its description
        (line,) = [line for line in lines if line.split()[:1] == [name]]
        assert len(line.split()) > 2 and len(line) <= 100, line
    assert "BK-SDM-Small block removal" in text and "a tiny VAE instead of the full one" in text
    targets = text.split("targets (--target):", 1)[1]
    for name, words in [("onnx", "ONNX Runtime"), ("torch", "PyTorch"), ("tensorrt", "TensorRT engines")]:
        assert any(line.split()[:1] == [name] and words in line for line in targets.splitlines()), name
