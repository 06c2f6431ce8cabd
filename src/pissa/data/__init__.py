"""Datasets and their formats, the embedded tasks, encoding, batching and the loss of a batch.
"""
