"""The two engines the experiments run on: projection to pixels (`project`, with its backward `rules`, receptive-field
`crop` and shared batched `passes`: deconvnet, guided backprop, saliency, Sec. 2.1) and dataset-scale top-k `mine`;
plus the exact `incremental` inference behind occlusion (the model's `graph` of op calls, the `locality` of each op,
the `windows` it carries, the `occluder` that drives it), and pooled per-layer `features` with a disk cache (the
codes that the probes of Sec. 5 and the t-SNE of the CS231n notes embed).

May import zfnet.core, zfnet.data, zfnet.models and zfnet.inspect.
"""
