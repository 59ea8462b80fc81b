"""Quantization: methods of the linear layer (create weights, load, apply), one file each.

`none` is the null method. See base.py for the registry and checkpoint detection.
"""
from ember.quant.base import (QUANT_METHODS, QuantConfig, QuantLinearMethod,  # noqa: F401
                              detect_quant_config, linear_method_for, resolve_quant_config)
