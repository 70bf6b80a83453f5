"""The architectures every zoo test runs on: what users bring most often, in eval mode, seeded random init.

Each entry builds a fresh model; SIZE is the input side used throughout (small enough for CPU CI, large
enough that every network keeps spatial maps to its last stage).
"""

import torch

SIZE = 128

TORCHVISION = ["resnet18", "resnet50", "vgg16_bn", "alexnet", "mobilenet_v2", "mobilenet_v3_small",
               "densenet121", "efficientnet_b0", "regnet_x_400mf", "convnext_tiny", "googlenet", "inception_v3",
               "shufflenet_v2_x1_0", "squeezenet1_0"]
TIMM = ["resnet18", "efficientnet_b0", "convnext_atto", "regnetx_002", "vgg11", "ghostnet_100"]
NAMES = [f"tv.{n}" for n in TORCHVISION] + [f"timm.{n}" for n in TIMM]


def build(name: str) -> torch.nn.Module:
    """A zoo model by its NAMES entry ("tv.resnet18", "timm.convnext_atto"), seeded, in eval mode."""
    torch.manual_seed(0)
    source, arch = name.split(".", 1)
    if source == "tv":
        import torchvision

        kwargs = {}
        if arch in ("googlenet", "inception_v3"):  # no auxiliary heads in eval; skip scipy's slow init
            kwargs = {"aux_logits": False, "init_weights": False}
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
    else:
        import timm

        model = timm.create_model(arch, pretrained=False)
    return model.eval()
