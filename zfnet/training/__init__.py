"""Sec. 3 of the paper, training: the recipe (`recipe`), the networks a run trains and feature scale clipping
(`networks`), checkpoints, the Table 3 ablations (`ablation`), feature evolution (Fig. 4, `evolution`) and
architecture diagnosis (Fig. 6, `diagnosis`).

May import zfnet.core, data, models, inspect, engine and present; not the other sections. `import zfnet`
loads the recipe only on first use of `zfnet.train` / `zfnet.TrainConfig`.
"""
