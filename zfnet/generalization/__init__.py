"""Sec. 5 of the paper, feature generalization: frozen features (zfnet.engine.features), the Caltech protocol and
linear classifiers (`protocol`), per-layer probes and the few-shot curve (Table 7, Fig. 9, `probes`), the
from-scratch baseline (Table 4, `scratch`) and the train/test overlap check (Sec. 5.2, `overlap`).

May import zfnet.core, data, models, inspect, engine and present; not the other sections.
"""
