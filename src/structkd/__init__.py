"""structkd: structural (SSIM) knowledge distillation for torchvision object detectors."""

__version__ = "0.1.0"
