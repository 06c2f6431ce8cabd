"""Diagnostics that return tables: spectra, intruder dimensions, quantization error; one writer for md, csv and
png.
"""
