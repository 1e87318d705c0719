"""tfgpud: can TensorFlow use this machine's NVIDIA GPUs, and if not, why."""

__version__ = "0.1.0"
