"""gandlf-dimlift: 3D GaNDLF architectures that start from 2D ImageNet-pretrained vision networks.

Importing the package is cheap (the startup hook does it in every Python process): it registers the plugin
architectures at once if GaNDLF's models are already imported, and otherwise arms a one-shot hook that
registers them the moment `GANDLF.models` is imported. Heavy parts load on first use.
"""

from gandlf_dimlift import _startup

__version__ = "0.1.0"
__all__ = ["lift", "register", "__version__"]

_startup.install()


def __getattr__(name: str):
    if name == "register":
        from gandlf_dimlift.registry import register

        return register
    if name == "lift":
        from gandlf_dimlift.lift import lift

        return lift
    raise AttributeError(f"module 'gandlf_dimlift' has no attribute {name!r}")
