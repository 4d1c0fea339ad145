"""Throwaway passes registered under test-only names (`_test_passes_*`), shared by the unit and integration tests
of the pass manager: import this module for its registrations."""

from __future__ import annotations

from sdcompiler.passes import Pass, register_pass


@register_pass
class _TestQuantize(Pass):
    name = "_test_passes_quantize"
    stage = "quantize"

    def run(self, pipe, config, ctx):
        return {}


@register_pass
class _TestMerge(Pass):
    name = "_test_passes_merge"
    stage = "merge"

    def run(self, pipe, config, ctx):
        return {}


@register_pass
class _TestSneakyRename(Pass):
    """Changes the U-Net's parameter layout while declaring changes_structure=False."""

    name = "_test_passes_sneaky_rename"
    stage = "noop"
    changes_structure = False

    def run(self, pipe, config, ctx):
        pipe.unet.conv_in_renamed = pipe.unet.conv_in
        del pipe.unet.conv_in
        return {}
