"""Pure tensor math: SVDs, the factor algebra, one init function per method and the registry of method records,
the NF4 codec and QPiSSA. No nn.Module, no files; imports nothing of pissa but errors.
"""
