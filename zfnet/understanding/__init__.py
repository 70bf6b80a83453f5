"""Sec. 4 of the paper, convnet visualization: the feature atlas (Fig. 2), occlusion sensitivity (Fig. 7),
invariance (Fig. 5) and the correspondence of object parts (Table 1).

May import zfnet.core, data, models, inspect, engine and present; not the other sections.
"""
