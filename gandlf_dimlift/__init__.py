"""gandlf-dimlift: 3D GaNDLF architectures that start from 2D ImageNet-pretrained vision networks."""

__version__ = "0.1.0"
