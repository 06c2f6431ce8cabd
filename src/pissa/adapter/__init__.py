"""Adapters in a model: AdapterConfig, the one target matcher, the adapted layer (and its 4-bit residual), attach
/ merge, save / load and the PEFT export.
"""
