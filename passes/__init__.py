"""Passes: graph-level transforms of a diffusers pipeline, their registry and manager.

Importing this package registers the built-in passes.
"""

# Built-in passes register themselves on import: one module per pass, named after it (quest_w4a4 is the
# `quest` package, which also serves the w4a8 / w8a8 presets).
from sdcompiler.passes import distill as _distill  # noqa: F401,E402
from sdcompiler.passes import distill_cfg as _distill_cfg  # noqa: F401,E402
from sdcompiler.passes import distill_steps as _distill_steps  # noqa: F401,E402
from sdcompiler.passes import feature_cache as _feature_cache  # noqa: F401,E402
from sdcompiler.passes import fuse_qkv as _fuse_qkv  # noqa: F401,E402
from sdcompiler.passes import merge_lora as _merge_lora  # noqa: F401,E402
from sdcompiler.passes import prune_blocks as _prune_blocks  # noqa: F401,E402
from sdcompiler.passes import ptq as _ptq  # noqa: F401,E402
from sdcompiler.passes import set_scheduler as _set_scheduler  # noqa: F401,E402
from sdcompiler.passes import slim_unet as _slim_unet  # noqa: F401,E402
from sdcompiler.passes import swap_attention as _swap_attention  # noqa: F401,E402
from sdcompiler.passes import swap_vae as _swap_vae  # noqa: F401,E402
from sdcompiler.passes.accounting import count_macs, count_params, unet_example_inputs
from sdcompiler.passes.base import (
    Pass,
    PassContext,
    PassProducts,
    PassRecord,
    QuantizedUNet,
    available_passes,
    get_pass,
    register_pass,
)
from sdcompiler.passes.config import PassConfig
from sdcompiler.passes.manager import ORDERING_RULES, PassManager, PassStep, check_order, rebuild
from sdcompiler.passes.quest import pass_ as _quest  # noqa: F401,E402

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
