"""The modeling code an exported folder carries (`dtl export --format hf`).

These two files are copied as they are into the folder, where transformers imports them through
`auto_map` with `trust_remote_code=True`. They import torch and transformers only, never dtl:
whoever loads the folder need not have dtl installed.
"""
