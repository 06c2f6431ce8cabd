"""Checkpoints on disk, shard by shard: pissa init (streamed decomposition), the streamed merge, sharded loading,
architecture discovery.
"""
