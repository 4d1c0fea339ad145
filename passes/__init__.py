"""Passes: graph-level transforms of a diffusers pipeline, their registry and manager.

Importing this package registers the built-in passes.
"""

from sdcompiler.passes.accounting import count_macs, count_params, unet_example_inputs
from sdcompiler.passes.base import (
    Pass, PassContext, PassProducts, PassRecord, QuantizedUNet, available_passes, get_pass, register_pass,
)
from sdcompiler.passes.config import PassConfig
from sdcompiler.passes.manager import ORDERING_RULES, PassManager, PassStep, check_order, rebuild

# Built-in passes register themselves on import.
from sdcompiler.passes import attention_swap as _attention_swap  # noqa: F401,E402
from sdcompiler.passes import block_pruning as _block_pruning  # noqa: F401,E402
from sdcompiler.passes import cfg_distill as _cfg_distill  # noqa: F401,E402
from sdcompiler.passes import distill as _distill  # noqa: F401,E402
from sdcompiler.passes import feature_cache as _feature_cache  # noqa: F401,E402
from sdcompiler.passes import fuse_qkv as _fuse_qkv  # noqa: F401,E402
from sdcompiler.passes import lora as _lora  # noqa: F401,E402
from sdcompiler.passes import ptq as _ptq  # noqa: F401,E402
from sdcompiler.passes.quest import pass_ as _quest  # noqa: F401,E402
from sdcompiler.passes import scheduler as _scheduler  # noqa: F401,E402
from sdcompiler.passes import step_distill as _step_distill  # noqa: F401,E402
from sdcompiler.passes import vae_swap as _vae_swap  # noqa: F401,E402

__all__ = [
    "ORDERING_RULES",
    "Pass",
    "PassConfig",
    "PassContext",
    "PassManager",
    "PassProducts",
    "PassRecord",
    "PassStep",
    "QuantizedUNet",
    "available_passes",
    "check_order",
    "count_macs",
    "count_params",
    "get_pass",
    "rebuild",
    "register_pass",
    "unet_example_inputs",
]
