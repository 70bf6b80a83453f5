"""The vocabulary of every experiment: the layer table and default feature layers (`layers`), taps that
read layers in one forward pass (`taps`), layer and unit names ("layer4.1.relu#2:7@3,4", `units`), and
the receptive fields behind the table, exact and local (`fields`, followed through a forward pass by
`tracker`).

May import zfnet.core, zfnet.data and zfnet.models.
"""
