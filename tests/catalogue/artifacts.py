"""Damaged, tampered or foreign artifacts given to `generate`, `verify` and `export-server`, and checkpoints whose
weights hold NaN: each refused before any model is built."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from catalogue import Case
from sdcompiler.artifact import sha256_file

TORCH_LOAD = ("sdcompiler.targets.torch_target.TorchTarget.load",)
ONNX_LOAD = ("sdcompiler.targets.onnx_target.OnnxTarget.load",)
MODEL_BUILT = ("sdcompiler.loading._pipeline_class", "sdcompiler.loading._from_single_file")


def _generate(artifact: Path, tmp: Path, *extra: str) -> list[str]:
    return ["generate", str(artifact), "--prompt", "a cube", "--steps", "2", "--out", str(tmp / "x.png"), *extra]


def _flip_byte(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(artifact: Path, edit) -> None:
    file = artifact / "manifest.json"
    manifest = json.loads(file.read_text())
    edit(manifest)
    file.write_text(json.dumps(manifest))


def _rehash(artifact: Path, name: str) -> None:
    """Make the manifest agree with a changed file, as an attacker who edits both would."""
    _edit_manifest(artifact, lambda m: m["files"].__setitem__(name, sha256_file(artifact / name)))


def _tampered_weights(tmp, inputs):
    artifact = inputs.copy_artifact(tmp, "torch")
    _flip_byte(artifact / "unet" / "diffusion_pytorch_model.safetensors")
    return _generate(artifact, tmp)


def _tampered_onnx(tmp, inputs):
    artifact = inputs.copy_artifact(tmp, "onnx")
    _flip_byte(artifact / "unet" / "model.onnx")
    return _generate(artifact, tmp)


def _tampered_config(tmp, inputs):
    artifact = inputs.copy_artifact(tmp, "torch")
    config = artifact / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"steps_offset": 1', '"steps_offset": 7'))
    return _generate(artifact, tmp)


def _tampered_verify(tmp, inputs):
    artifact = inputs.copy_artifact(tmp, "torch")
    _flip_byte(artifact / "text_encoder" / "model.safetensors")
    return ["verify", str(artifact)]


def _tampered_export(tmp, inputs):
    artifact = inputs.copy_artifact(tmp, "onnx")
    _flip_byte(artifact / "vae_decoder" / "model.onnx")
    return ["export-server", str(artifact), "--out", str(tmp / "repo")]


def _missing_file(tmp, inputs):
    artifact = inputs.copy_artifact(tmp, "torch")
    (artifact / "vae" / "config.json").unlink()
    return _generate(artifact, tmp)


def _manifest(text: str):
    def build(tmp, inputs):
        artifact = inputs.copy_artifact(tmp, "torch")
        (artifact / "manifest.json").write_text(text)
        return _generate(artifact, tmp)

    return build


def _manifest_edit(edit, target="torch", command=_generate):
    def build(tmp, inputs):
        artifact = inputs.copy_artifact(tmp, target)
        _edit_manifest(artifact, edit)
        return command(artifact, tmp)

    return build


def _escaping_name(name: str):
    def edit(manifest):
        manifest["files"][name] = "0" * 64

    return _manifest_edit(edit)


def _linked_out(tmp, inputs):
    artifact = inputs.copy_artifact(tmp, "torch")
    (tmp / "outside.json").write_text("{}")
    (artifact / "vae" / "config.json").unlink()
    (artifact / "vae" / "config.json").symlink_to(tmp / "outside.json")
    return _generate(artifact, tmp)


def _index_escape(tmp, inputs):
    artifact = inputs.copy_artifact(tmp, "torch")
    index = artifact / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"conv_in.weight": "../../../../etc/hostname"}}))
    _edit_manifest(artifact, lambda m: m["files"].__setitem__(index.relative_to(artifact).as_posix(), "0" * 64))
    _rehash(artifact, index.relative_to(artifact).as_posix())
    return _generate(artifact, tmp)


def _onnx_edit(edit, command=_generate):
    def build(tmp, inputs):
        import onnx

        artifact = inputs.copy_artifact(tmp, "onnx")
        path = artifact / "text_encoder" / "model.onnx"
        model = onnx.load(str(path), load_external_data=False)
        edit(model)
        onnx.save(model, str(path))
        _rehash(artifact, "text_encoder/model.onnx")
        return command(artifact, tmp)

    return build


def _custom_domain(model) -> None:
    import onnx

    model.graph.node[0].domain = "com.example.evil"
    model.opset_import.append(onnx.helper.make_opsetid("com.example.evil", 1))


def _external_outside(model) -> None:
    import onnx

    tensor = next(t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../../../../etc/hostname")


def _external_unlisted(model) -> None:
    import onnx

    tensor = next(t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="extra.data")


def _export(artifact: Path, tmp: Path) -> list[str]:
    return ["export-server", str(artifact), "--out", str(tmp / "repo")]


def _nan_folder(tmp, inputs):
    folder = inputs.copy_checkpoint(tmp)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors["conv_in.weight"].view(-1)[3] = float("nan")
    save_file(tensors, str(weights))
    return ["compile", str(folder), "--recipe", "none", "--target", "torch", "--out", str(tmp / "out")]


def _inf_single_file(tmp, inputs):
    """An original-layout single file (SD1.5 key names) whose U-Net input conv holds an Inf."""
    weight = torch.zeros(32, 4, 3, 3)
    weight[0, 0, 0, 0] = float("inf")
    tensors = {
        "model.diffusion_model.input_blocks.0.0.weight": weight,
        "cond_stage_model.transformer.x": torch.zeros(4),
    }
    save_file(tensors, str(tmp / "model.safetensors"))
    return [
        "compile",
        str(tmp / "model.safetensors"),
        "--recipe",
        "none",
        "--target",
        "torch",
        "--out",
        str(tmp / "out"),
    ]


CASES = [
    Case(
        "artifact weight byte flipped", _tampered_weights, ("diffusion_pytorch_model.safetensors", "sha256"), TORCH_LOAD
    ),
    Case("artifact onnx graph byte flipped", _tampered_onnx, ("unet/model.onnx", "sha256"), ONNX_LOAD),
    Case("artifact config edited", _tampered_config, ("scheduler_config.json", "sha256"), TORCH_LOAD),
    Case("verify finds a flipped byte", _tampered_verify, ("text_encoder/model.safetensors", "sha256")),
    Case("export-server input tampered", _tampered_export, ("vae_decoder/model.onnx", "sha256")),
    Case("artifact file missing", _missing_file, ("missing", "vae/config.json"), TORCH_LOAD),
    Case("manifest is a list", _manifest("[]"), ("json list",), TORCH_LOAD),
    Case("manifest is null", _manifest("null"), ("json nonetype",), TORCH_LOAD),
    Case("manifest not json", _manifest("{"), ("not valid json",), TORCH_LOAD),
    Case(
        "manifest holds NaN",
        _manifest('{"schema_version": 1, "x": NaN}'),
        ("not strict json", "nan"),
        TORCH_LOAD,
    ),
    Case("manifest schema version", _manifest_edit(lambda m: m.update(schema_version=99)), ("schema_version",)),
    Case("manifest without files", _manifest_edit(lambda m: m.pop("files")), ("files is missing",), TORCH_LOAD),
    Case(
        "manifest target not a string", _manifest_edit(lambda m: m.update(target=5)), ("target is a int",), TORCH_LOAD
    ),
    Case(
        "manifest lowering config missing",
        _manifest_edit(lambda m: m["lowering"].pop("config")),
        ("lowering.config",),
        TORCH_LOAD,
    ),
    Case(
        "manifest sha256 not hex",
        _manifest_edit(lambda m: m["files"].__setitem__("model_index.json", "abc")),
        ("model_index.json", "sha256"),
        TORCH_LOAD,
    ),
    Case("manifest names ../ path", _escaping_name("../../../../etc/passwd"), ("outside the artifact",), TORCH_LOAD),
    Case("manifest names absolute path", _escaping_name("/etc/hostname"), ("outside the artifact",), TORCH_LOAD),
    Case("artifact file links outside", _linked_out, ("links outside",), TORCH_LOAD),
    Case("weight index names outside file", _index_escape, ("weight file", "outside"), TORCH_LOAD),
    Case("onnx custom op domain", _onnx_edit(_custom_domain), ("com.example.evil", "custom-op"), ONNX_LOAD),
    Case("onnx custom op domain at export-server", _onnx_edit(_custom_domain, _export), ("custom-op",)),
    Case("onnx external data outside", _onnx_edit(_external_outside), ("external data", "outside"), ONNX_LOAD),
    Case("onnx external data unlisted", _onnx_edit(_external_unlisted), ("extra.data", "not a file"), ONNX_LOAD),
    Case("checkpoint folder with NaN weight", _nan_folder, ("conv_in.weight", "nan", "--allow-nonfinite"), MODEL_BUILT),
    Case(
        "single-file checkpoint with Inf weight",
        _inf_single_file,
        ("input_blocks.0.0.weight", "1 inf", "--allow-nonfinite"),
        MODEL_BUILT,
    ),
]
