"""DDPM (Ho, Jain & Abbeel 2020) in PyTorch: the paper's math, network, training and evaluation."""

from .config import Config, build_diffusion, build_model, get_preset, PRESETS
from .diffusion import GaussianDiffusion, LossType, MeanType, Schedule, VarType
from .unet import UNet

__version__ = "0.1.0"
__all__ = ["Config", "GaussianDiffusion", "LossType", "MeanType", "PRESETS", "Schedule", "UNet",
           "VarType", "build_diffusion", "build_model", "get_preset"]
