"""`export_server` / `sdcompiler export-server`: Triton model repositories from onnx artifacts.

Oracles: every config.pbtxt parses as Triton's `ModelConfig` (tritonclient's model_config_pb2) and
matches the ONNX graphs it serves; the pipeline model's BLS components, run against ONNX Runtime
sessions over the repository's own files behind a Triton-like request check, give the images of
the artifact's `load_compiled` pipeline; the generated model.py runs against a stand-in for
`triton_python_backend_utils`. No tritonserver runs here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from sdcompiler import serving
from sdcompiler.cli import main
from sdcompiler.errors import ArtifactError, ConfigError
from sdcompiler.passes.onnx_export import graph_path
from sdcompiler.sampling import generate
from sdcompiler.serving import ModelSpec, TensorSpec, bls_components, export_server, model_config
from sdcompiler.targets.tensorrt import tensorrt_model_spec

CASES = {  # (arch, recipe) -> the component models its repository serves
    ("sd15", "none"): ["text_encoder", "unet", "vae_decoder"],
    ("sdxl", "none"): ["text_encoder", "text_encoder_2", "unet", "vae_decoder"],
    # the graphs a cached loop runs: the refresh graph (unet/refresh.onnx + the U-Net's weights file) and the shallow one
    ("sd15", "deepcache"): ["text_encoder", "unet_refresh", "unet_shallow", "vae_decoder"],
}
ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.INT64: "TYPE_INT64",
}
TRITON_TO_NUMPY = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64}
KIND_GPU, KIND_CPU = model_config_pb2.ModelInstanceGroup.KIND_GPU, model_config_pb2.ModelInstanceGroup.KIND_CPU
PIPELINE_INPUTS = [
    "prompt",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "height",
    "width",
    "num_images",
    "image",
    "strength",
    "loras",
    "control_image",
    "mask_image",
    "denoising_end",
    "aesthetic_score",
    "negative_aesthetic_score",
]


@pytest.fixture(scope="module")
def repos(compiled, tmp_path_factory):
    """(arch, recipe) -> (artifact pipeline, exported repository), exported once per module."""
    root = tmp_path_factory.mktemp("repos")
    built = {}

    def get(arch: str, recipe: str):
        if (arch, recipe) not in built:
            pipe = compiled(arch, "onnx", recipe)
            env = {"python_env": "$$TRITON_MODEL_DIRECTORY/env.tar.gz"} if recipe == "deepcache" else {}
            built[arch, recipe] = pipe, export_server(pipe.root, root / f"{arch}-{recipe}", **env)
        return built[arch, recipe]

    return get


def parse_config(path: Path):
    return parse_text(path.read_text())


def parse_text(text: str):
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def onnx_io(path: Path):
    """[(name, Triton type, shape with -1 for dynamic)] of the graph's inputs and outputs, read with onnx."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def tensors(values):
        return [
            (
                v.name,
                ONNX_TO_TRITON[v.type.tensor_type.elem_type],
                [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim],
            )
            for v in values
        ]

    return tensors(graph.input), tensors(graph.output)


def type_name(data_type) -> str:
    return model_config_pb2.DataType.Name(data_type)


@pytest.mark.parametrize("arch,recipe", list(CASES))
def test_every_config_parses_and_matches_the_onnx_graphs(repos, arch, recipe):
    pipe, repo = repos(arch, recipe)
    configs = {p.parent.name: parse_config(p) for p in repo.glob("*/config.pbtxt")}
    assert sorted(configs) == sorted(CASES[arch, recipe] + ["pipeline"])
    for name in CASES[arch, recipe]:
        config = configs[name]
        model = repo / name / "1" / "model.onnx"
        assert os.path.samefile(model, pipe.root / graph_path(name))  # hard-linked, same filesystem
        weights = pipe.root / graph_path(name).rsplit("/", 1)[0] / "model.onnx.data"
        if weights.is_file():  # the external data travels with the graph
            assert os.path.samefile(repo / name / "1" / "model.onnx.data", weights)
        assert config.name == name and config.platform == "onnxruntime_onnx"
        # the U-Nets' timestep is a 0-d scalar: no batching there; the text encoders and the VAE batch
        assert config.max_batch_size == (0 if name.startswith("unet") else 8)
        # no kind given: an fp32 onnx artifact's models run on CPU instances (serving.default_kind)
        assert [(g.kind, g.count) for g in config.instance_group] == [(KIND_CPU, 1)]
        inputs, outputs = onnx_io(model)
        for declared, graph in ((config.input, inputs), (config.output, outputs)):
            assert [t.name for t in declared] == [name for name, _, _ in graph]
            for tensor, (_, dtype, shape) in zip(declared, graph):
                assert type_name(tensor.data_type) == dtype
                if config.max_batch_size:
                    assert shape[0] == -1 and list(tensor.dims) == shape[1:]
                else:
                    assert list(tensor.dims) == (shape or [1])
        if name.startswith("unet"):
            assert list(next(t for t in config.input if t.name == "timestep").dims) == [1]

    pipeline = configs["pipeline"]
    # rows of prompts are its batch: dynamic batching hands it concurrent requests together
    assert pipeline.backend == "python" and pipeline.max_batch_size == 8 and pipeline.HasField("dynamic_batching")
    assert [t.name for t in pipeline.input] == PIPELINE_INPUTS
    assert all(t.optional for t in pipeline.input)  # a missing prompt gets the Python API's message
    assert type_name(pipeline.input[0].data_type) == "TYPE_STRING"
    assert [(o.name, type_name(o.data_type), list(o.dims)) for o in pipeline.output] == [
        ("images", "TYPE_UINT8", [-1, -1, -1, 3])
    ]
    assert [g.kind for g in pipeline.instance_group] == [KIND_CPU]
    env = {k: v.string_value for k, v in pipeline.parameters.items()}
    assert env == ({"EXECUTION_ENV_PATH": "$$TRITON_MODEL_DIRECTORY/env.tar.gz"} if recipe == "deepcache" else {})
    served = repo / "pipeline" / "1"
    assert json.loads((served / "manifest.json").read_text()) == pipe.manifest
    for name in (
        "model.py",
        "models.json",
        "model_index.json",
        "scheduler/scheduler_config.json",
        *(f"{t}/vocab.json" for t in ("tokenizer", "tokenizer_2")[: 1 + (arch == "sdxl")]),
    ):
        assert (served / name).is_file(), name


def triton_infer(repo: Path):
    """`infer` over ONNX Runtime sessions on the repository's files, checking each request as Triton would."""
    import onnxruntime as ort

    configs = {p.parent.name: parse_config(p) for p in repo.glob("*/config.pbtxt")}
    sessions = {}
    calls = []

    def infer(model_name: str, inputs: dict, outputs: list) -> dict:
        config = configs[model_name]
        declared = {t.name: t for t in config.input}
        assert {n for n, t in declared.items() if not t.optional} <= set(inputs) <= set(declared)
        assert set(outputs) <= {t.name for t in config.output}
        for name, array in inputs.items():
            tensor, batch = declared[name], config.max_batch_size
            assert array.dtype == TRITON_TO_NUMPY[type_name(tensor.data_type)], (model_name, name, array.dtype)
            shape = array.shape[1:] if batch else array.shape
            assert len(shape) == len(tensor.dims) and all(d in (-1, s) for d, s in zip(tensor.dims, shape)), name
            assert not batch or 1 <= array.shape[0] <= batch
        if model_name not in sessions:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            sessions[model_name] = ort.InferenceSession(
                str(repo / model_name / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"]
            )
        session = sessions[model_name]
        scalar = {i.name for i in session.get_inputs() if not i.shape}
        # the ONNX Runtime backend feeds a one-element tensor to a 0-d model input as a scalar
        feed = {n: a.reshape(()) if n in scalar else a for n, a in inputs.items()}
        calls.append(model_name)
        return dict(zip(outputs, session.run(outputs, feed)))

    infer.calls = calls
    return infer


REQUESTS = {  # what each case asks for: CFG with a negative prompt, SDXL's zeroed negatives, a cached trajectory
    ("sd15", "none"): dict(
        prompt=["a red cube", "a blue ball"],
        negative_prompt=["blurry", "dark"],
        num_inference_steps=3,
        guidance_scale=5.0,
        height=64,
        width=48,
    ),
    ("sdxl", "none"): dict(prompt=["a red cube"], num_inference_steps=2, guidance_scale=5.0, height=48, width=64),
    ("sd15", "deepcache"): dict(prompt=["a red cube"], num_inference_steps=4, guidance_scale=7.5, height=64, width=64),
}


@pytest.mark.parametrize("arch,recipe", list(CASES))
def test_bls_components_reproduce_the_artifact_pipeline(repos, arch, recipe):
    pipe, repo = repos(arch, recipe)
    request = REQUESTS[arch, recipe]
    expected = pipe(**request, generator=torch.Generator().manual_seed(3), output_type="np").images
    served = repo / "pipeline" / "1"
    infer = triton_infer(repo)
    components = bls_components(infer, served, json.loads((served / "manifest.json").read_text()))
    images = generate(components, **request, generator=torch.Generator().manual_seed(3), output_type="np")
    np.testing.assert_allclose(images, expected, atol=1e-5, rtol=0)
    assert set(infer.calls) == set(CASES[arch, recipe])  # deepcache: the shallow model ran too


def fake_pb_utils(infer) -> types.ModuleType:
    """The slice of `triton_python_backend_utils` that model.py uses, with BLS requests sent to `infer`."""
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, np.asarray(array)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

    class TritonError:
        def __init__(self, message):
            self._message = message

        def message(self):
            return self._message

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.outputs, self._error = {t.name(): t for t in output_tensors}, error

        def has_error(self):
            return self._error is not None

        def error(self):
            return self._error

    class InferenceRequest:
        def __init__(self, model_name, requested_output_names, inputs, preferred_memory=None):
            self.model_name, self.requested = model_name, list(requested_output_names)
            self.inputs = {t.name(): t for t in inputs}
            assert preferred_memory == ("cpu", 0)

        def parameters(self):
            return "{}"

        def exec(self):
            try:
                out = infer(self.model_name, {n: t.as_numpy() for n, t in self.inputs.items()}, self.requested)
            except Exception as exc:
                return InferenceResponse([], TritonError(str(exc)))
            return InferenceResponse([Tensor(n, a) for n, a in out.items()])

    pb.Tensor, pb.TritonError = Tensor, TritonError
    pb.InferenceResponse, pb.InferenceRequest = InferenceResponse, InferenceRequest
    pb.TritonModelException = type("TritonModelException", (Exception,), {})
    pb.TRITONSERVER_MEMORY_CPU = "cpu"
    pb.PreferredMemory = lambda kind, device_id=0: (kind, device_id)
    pb.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    pb.get_output_tensor_by_name = lambda response, name: response.outputs.get(name)
    return pb


def test_generated_model_py_serves_uint8_images_and_one_line_errors(repos, monkeypatch):
    pipe, repo = repos("sd15", "none")
    pb = fake_pb_utils(triton_infer(repo))
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location("served_pipeline_model", repo / "pipeline" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_repository": str(repo / "pipeline"), "model_version": "1"})

    def client_request(**inputs):
        return pb.InferenceRequest("pipeline", ["images"], [pb.Tensor(n, a) for n, a in inputs.items()], ("cpu", 0))

    good = client_request(  # two rows, each with its own seed
        prompt=np.array([[b"a red cube"], [b"a blue ball"]], dtype=object),
        num_inference_steps=np.array([[2], [2]], np.int32),
        guidance_scale=np.array([[5.0], [5.0]], np.float32),
        seed=np.array([[11], [12]], np.int64),
        height=np.array([[64], [64]], np.int32),
        width=np.array([[48], [48]], np.int32),
    )
    bad = client_request(prompt=np.array([[b"a red cube"]], dtype=object), height=np.array([[60]], np.int32))
    answers = model.execute([good, bad])

    image = answers[0].outputs["images"].as_numpy()
    assert image.dtype == np.uint8 and image.shape == (2, 1, 64, 48, 3)
    for row, (prompt, seed) in enumerate([("a red cube", 11), ("a blue ball", 12)]):
        expected = pipe(
            prompt,
            num_inference_steps=2,
            guidance_scale=5.0,
            height=64,
            width=48,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images
        assert np.abs(image[row].astype(int) - (expected * 255).round().astype(int)).max() <= 1
    assert answers[1].has_error() and "height=60" in answers[1].error().message()
    assert "\n" not in answers[1].error().message()


def test_pipeline_layout_holds_the_artifact_and_serves_it_with_load_compiled(compiled, tmp_path, monkeypatch):
    """Layout "pipeline" (the default for torch artifacts; what `sdcompiler serve` runs): the Python model alone,
    the artifact hard-linked into it, model.py loading it with load_compiled (run here against the stand-in)."""
    pipe = compiled("sd15", "torch", "none")
    repo = export_server(pipe.root, tmp_path / "repo")
    assert sorted(p.name for p in repo.iterdir()) == ["pipeline"]
    config = parse_config(repo / "pipeline" / "config.pbtxt")
    assert config.backend == "python" and config.max_batch_size == 8 and config.HasField("dynamic_batching")
    version = repo / "pipeline" / "1"
    for name in [*pipe.manifest["files"], "manifest.json"]:
        assert os.path.samefile(version / "artifact" / name, pipe.root / name), name
    assert "load_compiled(folder / 'artifact', device=None)" in (version / "model.py").read_text()

    pb = fake_pb_utils(None)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location("served_pipeline_layout", version / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_repository": str(repo / "pipeline"), "model_version": "1"})
    request = pb.InferenceRequest(
        "pipeline",
        ["images"],
        [
            pb.Tensor("prompt", np.array([[b"a red cube"]], dtype=object)),
            pb.Tensor("num_inference_steps", np.array([[2]], np.int32)),
            pb.Tensor("seed", np.array([[5]], np.int64)),
            pb.Tensor("height", np.array([[64]], np.int32)),
            pb.Tensor("width", np.array([[64]], np.int32)),
        ],
        ("cpu", 0),
    )
    (answer,) = model.execute([request])
    expected = pipe(
        "a red cube",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
    ).images
    images = answer.outputs["images"].as_numpy()
    assert images.shape == (1, 1, 64, 64, 3)
    assert np.abs(images[0].astype(int) - (expected * 255).round().astype(int)).max() <= 1

    onnx_repo = export_server(compiled("sd15", "onnx", "none").root, tmp_path / "onnx", layout="pipeline", device="cpu")
    assert sorted(p.name for p in onnx_repo.iterdir()) == ["pipeline"]
    assert "device='cpu'" in (onnx_repo / "pipeline" / "1" / "model.py").read_text()
    with pytest.raises(ConfigError, match="layout='flat' is not one of components, pipeline"):
        export_server(pipe.root, tmp_path / "never", layout="flat")

    # a LoRA folder: the config's lora_dir parameter, read by model.py; a request naming a LoRA it lacks fails alone
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "style.safetensors").write_bytes(b"")
    repo = export_server(pipe.root, tmp_path / "with-loras", lora_dir=loras)
    config = parse_config(repo / "pipeline" / "config.pbtxt")
    assert config.parameters["lora_dir"].string_value == str(loras.resolve())
    model = module.TritonPythonModel()
    model.initialize(
        {
            "model_repository": str(repo / "pipeline"),
            "model_version": "1",
            "model_config": json.dumps({"parameters": {"lora_dir": {"string_value": str(loras)}}}),
        }
    )
    request = pb.InferenceRequest(
        "pipeline",
        ["images"],
        [
            pb.Tensor("prompt", np.array([[b"a red cube"]], dtype=object)),
            pb.Tensor("loras", np.array([[b"../x"]], dtype=object)),
        ],
        ("cpu", 0),
    )
    (answer,) = model.execute([request])
    assert answer.has_error() and answer.error().message().startswith("LoRA '../x' is not in the server's LoRA folder")
    with pytest.raises(ConfigError, match="lora_dir needs layout 'pipeline'") as info:
        export_server(compiled("sd15", "onnx", "none").root, tmp_path / "never", layout="components", lora_dir=loras)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="is not a folder"):
        export_server(pipe.root, tmp_path / "never", lora_dir=tmp_path / "missing")
    assert not (tmp_path / "never").exists()


def test_tensorrt_plan_config_from_a_description():
    """cc_model_filenames and optimization profiles, for the tensorrt target to come (no engine files needed)."""
    unet = ModelSpec(
        "unet",
        platform="tensorrt_plan",
        inputs=(
            TensorSpec("sample", "TYPE_FP16", (-1, 4, -1, -1)),
            TensorSpec("timestep", "TYPE_FP32", ()),
            TensorSpec("encoder_hidden_states", "TYPE_FP16", (-1, 77, 768)),
        ),
        outputs=(TensorSpec("out_sample", "TYPE_FP16", (-1, 4, -1, -1)),),
        cc_model_filenames={"8.0": "model_sm80.plan", "9.0": "model_sm90.plan"},
        profiles=("0", "1"),
    )
    config = text_format.Parse(
        model_config(unet, max_batch_size=8, kind="GPU", instance_count=2), model_config_pb2.ModelConfig()
    )
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 0
    assert dict(config.cc_model_filenames) == {"8.0": "model_sm80.plan", "9.0": "model_sm90.plan"}
    (group,) = config.instance_group
    assert (group.kind, group.count, list(group.profile)) == (KIND_GPU, 2, ["0", "1"])
    assert [list(t.dims) for t in config.input] == [[-1, 4, -1, -1], [1], [-1, 77, 768]]
    assert [type_name(t.data_type) for t in config.input] == ["TYPE_FP16", "TYPE_FP32", "TYPE_FP16"]

    encoder = ModelSpec(
        "text_encoder",
        platform="tensorrt_plan",
        inputs=(TensorSpec("input_ids", "TYPE_INT32", (-1, 77)),),
        outputs=(TensorSpec("last_hidden_state", "TYPE_FP16", (-1, 77, 768)),),
        cc_model_filenames={"8.9": "model_sm89.plan"},
    )
    config = text_format.Parse(
        model_config(encoder, max_batch_size=16, kind="GPU", instance_count=1), model_config_pb2.ModelConfig()
    )
    assert config.max_batch_size == 16 and config.HasField("dynamic_batching")
    assert [list(t.dims) for t in (*config.input, *config.output)] == [[77], [77, 768]]
    assert not config.instance_group[0].profile
    with pytest.raises(ConfigError, match="only on GPU"):
        model_config(encoder, max_batch_size=16, kind="CPU", instance_count=1)


def test_bad_inputs_give_one_line_errors(repos, compiled, tmp_path):
    pipe = compiled("sd15", "onnx", "none")
    with pytest.raises(ArtifactError, match="no manifest.json") as info:
        export_server(tmp_path, tmp_path / "repo")
    torch_artifact = tmp_path / "torch-artifact"
    torch_artifact.mkdir()
    (torch_artifact / "manifest.json").write_text(json.dumps({**pipe.manifest, "target": "torch"}))
    with pytest.raises(ArtifactError, match="needs an onnx .*tensorrt.* target 'torch'.*--layout pipeline") as info:
        export_server(torch_artifact, tmp_path / "repo", layout="components")
    assert "\n" not in str(info.value)

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="--overwrite"):
        export_server(pipe.root, occupied)
    with pytest.raises(ArtifactError, match="not a model repository written by export-server"):
        export_server(pipe.root, occupied, overwrite=True)
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
    for bad in (dict(kind="TPU"), dict(instance_count=0), dict(max_batch_size=-1)):
        with pytest.raises(ConfigError):
            export_server(pipe.root, tmp_path / "never", **bad)
    assert not (tmp_path / "never").exists() and not (tmp_path / "repo").exists()


def test_failed_export_leaves_nothing_and_keeps_an_old_repository(compiled, tmp_path, monkeypatch):
    pipe = compiled("sd15", "onnx", "none")
    repo = export_server(pipe.root, tmp_path / "repo")
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))

    def broken(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(serving, "_link_or_copy", broken)
    with pytest.raises(OSError):
        export_server(pipe.root, tmp_path / "fresh")
    with pytest.raises(OSError):
        export_server(pipe.root, repo, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no "fresh", no .partial / .old leftovers
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before

    monkeypatch.undo()
    assert export_server(pipe.root, repo, overwrite=True, kind="CPU") == repo
    assert parse_config(repo / "unet" / "config.pbtxt").instance_group[0].kind == KIND_CPU
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_cli_export_server(compiled, tmp_path, capsys):
    artifact = compiled("sd15", "onnx", "none").root
    out = tmp_path / "repo"
    assert (
        main(
            [
                "export-server",
                str(artifact),
                "--out",
                str(out),
                "--kind",
                "CPU",
                "--instances",
                "2",
                "--max-batch-size",
                "4",
                "--quiet",
            ]
        )
        == 0
    )
    assert "tritonserver --model-repository" in capsys.readouterr().out
    config = parse_config(out / "vae_decoder" / "config.pbtxt")
    assert config.max_batch_size == 4
    assert [(g.kind, g.count) for g in config.instance_group] == [(KIND_CPU, 2)]

    assert main(["export-server", str(artifact), "--out", str(out)]) == 1  # exists: needs --overwrite
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--overwrite" in err and "\n" not in err
    assert main(["export-server", str(tmp_path / "nope"), "--out", str(tmp_path / "r2")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "does not exist" in err and "\n" not in err


# --- tensorrt artifacts ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tensorrt_artifact(tiny_checkpoint, tmp_path_factory):
    """A tiny SD1.5 `tensorrt` artifact whose engines come from `FakeTensorRT` (b"engine": TensorRT cannot be
    installed here); everything else (exports, optimized graphs, manifest, plan layout) is the real target's."""
    from fake_tensorrt import FakeTensorRT

    from sdcompiler.compile import compile_artifact
    from sdcompiler.errors import require
    from sdcompiler.targets.tensorrt import target as tt

    patch = pytest.MonkeyPatch()
    fake = FakeTensorRT()
    patch.setattr(tt, "require", lambda module, *args: fake if module == "tensorrt" else require(module, *args))
    patch.setattr(tt.torch.cuda, "is_available", lambda: True)
    patch.setattr(tt, "compute_capability", lambda: "9.0")
    try:
        out = tmp_path_factory.mktemp("trt") / "artifact"
        compile_artifact(
            tiny_checkpoint("sd15"),
            target="tensorrt",
            output_dir=out,
            show_progress=False,
            target_options={"verify": False, "batch_size": [1, 2, 4]},
        )
    finally:
        patch.undo()
    return out


def test_tensorrt_artifact_serves_its_engines(tensorrt_artifact, tmp_path):
    repo = export_server(tensorrt_artifact, tmp_path / "repo", max_batch_size=8)
    names = ["text_encoder", "unet", "vae_decoder"]
    assert sorted(p.name for p in repo.iterdir()) == sorted([*names, "pipeline"])
    for name in names:
        config = parse_config(repo / name / "config.pbtxt")
        assert config.platform == "tensorrt_plan"
        assert dict(config.cc_model_filenames) == {"9.0": "model_sm90.plan"}
        assert [list(g.profile) for g in config.instance_group] == [["0"]]
        assert [g.kind for g in config.instance_group] == [KIND_GPU]
        plan = repo / name / "1" / "model_sm90.plan"
        assert plan.read_bytes() == b"engine" and os.path.samefile(plan, tensorrt_artifact / name / "model_sm90.plan")
        inputs, _ = onnx_io(tensorrt_artifact / name / "model.opt.onnx")
        assert {i.name: type_name(i.data_type) for i in config.input} == {n: t for n, t, _ in inputs}
    # batch: min(8, the profile's max images per call); the U-Net cannot batch (a scalar timestep)
    assert parse_config(repo / "text_encoder" / "config.pbtxt").max_batch_size == 4
    assert parse_config(repo / "vae_decoder" / "config.pbtxt").max_batch_size == 4
    unet = parse_config(repo / "unet" / "config.pbtxt")
    assert (
        unet.max_batch_size == 0 and {i.name: i.data_type for i in unet.input}["sample"] == model_config_pb2.TYPE_FP16
    )


def test_tensorrt_static_engines_do_not_batch_and_need_gpu_instances(tensorrt_artifact, tmp_path):
    static = {"profile": {"latent_sample": [[2, 4, 16, 16]] * 3}}
    spec = tensorrt_model_spec("vae_decoder", tensorrt_artifact / "vae_decoder", static)
    text = model_config(spec, max_batch_size=8, kind="GPU", instance_count=1)
    assert parse_text(text).max_batch_size == 0
    assert "the engine's optimization profile fixes the batch range to [2, 2]" in text
    with pytest.raises(ConfigError, match="TensorRT plans run only on GPU instances") as info:
        export_server(tensorrt_artifact, tmp_path / "repo", kind="CPU")
    assert "\n" not in str(info.value) and not (tmp_path / "repo").exists()


def test_default_kind_follows_the_artifact():
    from sdcompiler.serving import default_kind

    def manifest(target, precision):
        return {"target": target, "lowering": {"config": {"precision": precision}}}

    assert default_kind(manifest("onnx", "fp32"))[0] == "CPU"
    assert default_kind(manifest("onnx", "fp16")) == ("GPU", "its ONNX graphs are fp16, made for CUDA")
    assert default_kind(manifest("tensorrt", "fp16"))[0] == "GPU"


def test_cli_export_server_names_the_default_kind(compiled, tmp_path, capsys):
    artifact = compiled("sd15", "onnx", "none").root
    assert main(["export-server", str(artifact), "--out", str(tmp_path / "repo"), "--quiet"]) == 0
    assert "; CPU instances (its ONNX graphs are fp32" in capsys.readouterr().out
    config = parse_config(tmp_path / "repo" / "unet" / "config.pbtxt")
    assert [g.kind for g in config.instance_group] == [KIND_CPU]
