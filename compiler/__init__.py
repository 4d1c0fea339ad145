"""sd-compiler: compress and export Stable Diffusion / SDXL pipelines.

    from sdcompiler import compile_pipeline, load_compiled
    pipe = compile_pipeline("ckpt/", recipe="none", target="onnx", output_dir="out/")
    pipe = load_compiled("out/")
    images = pipe("a red cube", num_inference_steps=4).images

Importing this package imports neither triton, tensorrt nor modelopt, and
does not initialise CUDA.
"""

import logging

from sdcompiler.version import __version__


def _drop_optimum_distribution_notice(record: logging.LogRecord) -> bool:
    """False for diffusers' import-time "Multiple distributions found for package optimum" warning.

    optimum-onnx (the [optimum] extra) installs into the `optimum` namespace and depends on `optimum`, so both
    distributions always provide that package; diffusers warns about it on every import, with nothing to fix.
    """
    return not record.getMessage().startswith("Multiple distributions found for package optimum.")


# on the logger diffusers creates the record with (a logger's filters see only its own records), before
# diffusers is imported; other warnings from that module still show
logging.getLogger("diffusers.utils.import_utils").addFilter(_drop_optimum_distribution_notice)

__all__ = ["__version__", "benchmark", "compile_pipeline", "load_compiled"]


def __getattr__(name):  # lazy: keep `import sdcompiler` cheap
    if name == "compile_pipeline":
        from sdcompiler.compile import compile_pipeline

        return compile_pipeline
    if name == "load_compiled":
        from sdcompiler.runtime import load_compiled

        return load_compiled
    if name == "benchmark":
        from sdcompiler.bench import benchmark

        return benchmark
    raise AttributeError(f"module 'sdcompiler' has no attribute {name!r}")
