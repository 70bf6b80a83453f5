"""The vocabulary of every experiment: the layer table, taps that read layers in one forward pass, unit
addresses ("conv5:17@3,4") (`layers`), and the receptive fields behind the table (`fields`).

May import zfnet.core, zfnet.data and zfnet.models.
"""
