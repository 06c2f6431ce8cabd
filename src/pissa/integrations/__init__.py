"""Other libraries driving pissa models: transformers' Trainer and TRL.
"""
