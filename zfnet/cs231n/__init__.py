"""The rest of the CS231n notes "Visualizing what ConvNets learn", beside the paper's sections: layer
`activations` (every channel's map; dead and sparse channels over a folder), the `filters` of any conv layer,
the t-SNE of the `codes`, the `inversion` of codes back to images (Mahendran & Vedaldi 2015) and `fooling`
(FGSM / PGD adversarial examples, Nguyen et al.'s fooling images), plus top-1 / top-5 broken down by image
`attributes`.

A section like understanding, training and generalization (rank 5): may import zfnet.core, data, models,
inspect, engine and present; not the other sections.
"""
