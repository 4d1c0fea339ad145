"""set_scheduler: swap the pipeline's sampler and record the call defaults that go with it.

A diffusers scheduler is a function of the training noise schedule (betas,
`num_train_timesteps`, prediction type) plus sampler settings. The new
scheduler is built with `cls.from_config(pipe.scheduler.config, **options)`,
so the checkpoint's schedule carries over and only the sampler changes:

    LCMScheduler, options {original_inference_steps: 50}, 4 steps
        -> timesteps [999, 759, 499, 259], guidance 1 (no unconditional pass)
    DPMSolverMultistepScheduler, options {algorithm_type: dpmsolver++}

The artifact saves `pipe.scheduler` and names its class in model_index.json,
so swapping it is enough for every target. `num_inference_steps`,
`guidance_scale` and an explicit `timesteps` list become the compiled
pipeline's call defaults (`ctx.pipeline_defaults` -> manifest "defaults").
The U-Net is untouched: the pass pairs with a weight pass (e.g. an LCM-LoRA
merge) when the new sampler needs distilled weights.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any

from sdcompiler.passes.base import Pass, PassContext, register_pass
from sdcompiler.passes.config import PassConfig
from sdcompiler.passes.errors import ConfigError, PassError

# Shown when a name is unknown; any diffusers SchedulerMixin class is accepted.
COMMON_SCHEDULERS = (
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "LCMScheduler",
    "TCDScheduler",
    "UniPCMultistepScheduler",
)


@dataclass(frozen=True)
class SetSchedulerConfig(PassConfig):
    """Which scheduler, its config overrides, and the call defaults it comes with.

    Args:
        scheduler: a diffusers scheduler class name, e.g. "LCMScheduler".
        options: overrides of the scheduler config, e.g. {"original_inference_steps": 50}.
        timesteps: an explicit timestep list, for schedulers whose `set_timesteps` takes one.
        num_inference_steps: default step count of the compiled pipeline (with `timesteps`: its length).
        guidance_scale: default guidance of the compiled pipeline (<= 1 runs without CFG).
    """

    scheduler: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    timesteps: tuple[int, ...] | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        # Everything that depends on the config alone fails at recipe resolution, before any work.
        where = "config of pass 'set_scheduler'"
        cls = scheduler_class(self.scheduler, where)
        unknown = sorted(set(self.options) - scheduler_config_keys(cls), key=str)
        if unknown:
            verb = "is" if len(unknown) == 1 else "are"
            raise ConfigError(
                f"{where}: option(s) {', '.join(map(str, unknown))} {verb} not {self.scheduler} config key(s); "
                f"its keys: {', '.join(sorted(scheduler_config_keys(cls)))}"
            )
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ConfigError(f"{where}: num_inference_steps must be at least 1, got {self.num_inference_steps}")
        if self.timesteps is not None:
            if "timesteps" not in inspect.signature(cls.set_timesteps).parameters:
                raise ConfigError(
                    f"{where}: {self.scheduler}.set_timesteps takes no explicit timesteps; drop 'timesteps' or "
                    "use a scheduler that does (e.g. LCMScheduler, TCDScheduler, DPMSolverMultistepScheduler)"
                )
            if not self.timesteps:
                raise ConfigError(f"{where}: timesteps is empty; give at least one timestep or null")
            if self.num_inference_steps not in (None, len(self.timesteps)):
                raise ConfigError(
                    f"{where}: num_inference_steps={self.num_inference_steps} disagrees with the "
                    f"{len(self.timesteps)} timesteps given; drop one of them"
                )


def scheduler_class(name: str, where: str = "set_scheduler") -> type:
    """The diffusers scheduler class called `name`; ConfigError naming valid ones otherwise."""
    import diffusers
    from diffusers import SchedulerMixin

    if not name:
        raise ConfigError(f"{where}: 'scheduler' is required, e.g. {', '.join(COMMON_SCHEDULERS[:3])}")
    cls = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    if isinstance(cls, type) and issubclass(cls, SchedulerMixin):
        return cls
    backends = getattr(cls, "_backends", None)  # diffusers' placeholder for a class whose extra is missing
    extras = [b for b in backends or () if b != "torch"]
    if extras and not name.startswith("Flax"):
        raise ConfigError(f"{where}: scheduler {name!r} needs {' and '.join(extras)}; pip install {' '.join(extras)}")
    names = [n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("Flax")]
    close = difflib.get_close_matches(name, names, n=3)
    hint = (
        f"did you mean {', '.join(close[:-1])} or {close[-1]}? "
        if len(close) > 1
        else f"did you mean {close[0]}? "
        if close
        else ""
    )
    raise ConfigError(
        f"{where}: unknown scheduler {name!r}; {hint}any diffusers scheduler class works, "
        f"e.g. {', '.join(COMMON_SCHEDULERS)}"
    )


def scheduler_config_keys(cls: type) -> set[str]:
    """The config keys a scheduler class accepts: its `__init__` parameters."""
    params = inspect.signature(cls.__init__).parameters
    return {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def build_scheduler(pipe, config: SetSchedulerConfig):
    """The new scheduler on the pipeline's noise schedule, with `config.options` on top."""
    from diffusers.utils import logging

    # Keys of the old class that the new one lacks (PNDM's skip_prk_steps, ...) are expected to be dropped;
    # diffusers would warn about each as if the checkpoint's scheduler_config.json were wrong.
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return scheduler_class(config.scheduler).from_config(pipe.scheduler.config, **config.options)
    finally:
        logging.set_verbosity(verbosity)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@register_pass
class SetScheduler(Pass):
    name = "set_scheduler"
    controlnet = "keeps_layout"
    runtime_loras = True
    config_class = SetSchedulerConfig
    stage = "scheduler"
    changes_structure = False
    description = "replace the scheduler (config carried over from the checkpoint) and set the call defaults"

    def requires(self, pipe, config: SetSchedulerConfig, ctx: PassContext) -> None:
        # Build and schedule a throwaway copy: bad option values and bad timesteps fail here, before any change.
        try:
            trial = build_scheduler(pipe, config)
        except Exception as exc:  # noqa: BLE001  (schedulers raise ValueError, NotImplementedError, KeyError...)
            raise PassError(f"{config.scheduler} rejects options {config.options}: {_first_line(exc)}") from None
        try:
            if config.timesteps is not None:
                trial.set_timesteps(timesteps=list(config.timesteps))
            elif config.num_inference_steps is not None:
                trial.set_timesteps(config.num_inference_steps)
        except Exception as exc:  # noqa: BLE001
            what = (
                f"timesteps {list(config.timesteps)}"
                if config.timesteps is not None
                else f"num_inference_steps={config.num_inference_steps}"
            )
            raise PassError(f"{config.scheduler} cannot schedule {what}: {_first_line(exc)}") from None

    def run(self, pipe, config: SetSchedulerConfig, ctx: PassContext) -> dict[str, float]:
        # register_modules also updates pipe.config["scheduler"], which model_index.json follows.
        pipe.register_modules(scheduler=build_scheduler(pipe, config))
        # Explicit timesteps belong to the scheduler they were checked against: a later swap drops them.
        ctx.pipeline_defaults.pop("timesteps", None)
        defaults: dict[str, Any] = {}
        if config.timesteps is not None:
            defaults["timesteps"] = list(config.timesteps)
            defaults["num_inference_steps"] = len(config.timesteps)
        if config.num_inference_steps is not None:
            defaults["num_inference_steps"] = config.num_inference_steps
        if config.guidance_scale is not None:
            defaults["guidance_scale"] = config.guidance_scale
        ctx.pipeline_defaults.update(defaults)
        return {k: v for k, v in defaults.items() if k in ("num_inference_steps", "guidance_scale")}

    def ensures(self, pipe, config: SetSchedulerConfig, ctx: PassContext) -> None:
        if type(pipe.scheduler).__name__ != config.scheduler:
            raise PassError(f"the pipeline's scheduler is {type(pipe.scheduler).__name__}, not {config.scheduler}")
        if tuple(pipe.config["scheduler"])[1] != config.scheduler:
            raise PassError(f"the pipeline config still names scheduler {pipe.config['scheduler'][1]}")
