"""Plumbing every other part uses: the user-facing error, result files (atomic writes, strict JSON,
weights-only loading), progress bars and torchrun's process group.

Imports nothing else from zfnet.
"""
