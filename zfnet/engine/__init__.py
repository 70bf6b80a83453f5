"""The two engines the experiments run on: projection to pixels (`project`, with its backward `rules` and
receptive-field `crop`: deconvnet, guided backprop, saliency, Sec. 2.1) and dataset-scale top-k `mine`;
plus the exact `incremental` inference behind occlusion, with the `locality` of each op.

May import zfnet.core, zfnet.data, zfnet.models and zfnet.inspect.
"""
