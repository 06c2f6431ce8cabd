"""What pissa writes and reads: atomic folders, raw safetensors I/O, the adapter directory format, calibration
statistics files and tensor digests.
"""
