"""Where work runs: devices and precision, torch.distributed, the embedded models.
"""
