"""Keeping a trained model's function (preserve=True): the steps run after the walk (steps), GroupNorm affines
from BatchNorm statistics or calibration data (calibrate), the measured agreement (fidelity)."""
