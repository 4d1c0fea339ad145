"""A stand-in for the part of a diffusers pipeline that structural passes touch (tests only)."""


class UNetHolder:
    """`.unet` and `register_modules`: enough to run a structural pass on a bare U-Net."""

    def __init__(self, unet):
        self.unet = unet

    def register_modules(self, **modules):
        for name, module in modules.items():
            setattr(self, name, module)
