"""Activation and gradient statistics for the data-aware methods (pissa calibrate).
"""
