"""vggtrain: train VGG networks on CIFAR-10 from one YAML file."""

__version__ = "0.1.0"
