"""Running a model for text: decoding with the KV cache, chat rendering and streamed replies (pissa generate).
"""
