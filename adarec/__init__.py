"""adarec: a training engine for diffusion-augmented sequential recommendation."""

__version__ = "0.1.0"
