"""The served `pipeline` model's LoRA names: `serving.LoraFolder` (what a request's `loras` input may name) and
the config parameter that configures it. Serving rows with LoRAs against a real server: tests/integration/
test_serve.py (test_rows_run_with_the_loras_they_name); through model.py: tests/integration/test_export_server.py."""

from __future__ import annotations

import json

import pytest

from sdcompiler.errors import ConfigError, PipelineArgumentError
from sdcompiler.serving import LoraFolder, _row_loras, lora_folder


@pytest.fixture
def folder(tmp_path):
    for name in ("style", "ink-v2", "a.b"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a LoRA")
    outside = tmp_path.parent / "outside.safetensors"
    outside.write_bytes(b"")
    (tmp_path / "linked.safetensors").symlink_to(outside)
    return tmp_path


def test_names_resolve_to_files_with_scales_in_request_order(folder):
    loras = LoraFolder(folder)
    assert loras.resolve("") == () and loras.resolve(" , ") == ()
    assert loras.resolve("ink-v2:0.5, style") == (
        (str(folder.resolve() / "ink-v2.safetensors"), 0.5),
        (str(folder.resolve() / "style.safetensors"), 1.0),
    )
    assert loras.resolve("a.b:-1e-1") == ((str(folder.resolve() / "a.b.safetensors"), -0.1),)
    assert loras.names() == ["a.b", "ink-v2", "style"]  # not the link that leaves the folder


@pytest.mark.parametrize("text", ["nope", "../outside", "sub/style", ".style", "notes", "linked", "style.safetensors"])
def test_only_plain_names_of_the_folder_are_served(folder, text):
    with pytest.raises(PipelineArgumentError, match="is not in the server's LoRA folder .offered: a.b, ink-v2") as info:
        LoraFolder(folder).resolve(text)
    assert "\n" not in str(info.value)


def test_bad_scale_and_missing_folder(folder, tmp_path):
    with pytest.raises(PipelineArgumentError, match="'style:strong': the scale after ':' is not a number"):
        LoraFolder(folder).resolve("style:strong")
    with pytest.raises(PipelineArgumentError, match="this server offers no LoRAs: start it with a LoRA folder"):
        _row_loras("style", None)
    assert _row_loras("  ", None) == ()
    with pytest.raises(ConfigError, match="is not a folder"):
        LoraFolder(tmp_path / "missing")


def test_the_model_reads_its_folder_from_the_config(folder):
    config = {"parameters": {"lora_dir": {"string_value": str(folder)}}}
    assert lora_folder(json.dumps(config)).folder == folder.resolve()
    assert lora_folder(config).names()
    assert lora_folder("{}") is None and lora_folder({"parameters": {}}) is None
