"""The paper's networks (Sec. 3, Fig. 3; the AlexNet baseline; the Table 3 ablations) and SqueezeNet 1.1.

Every layer is a named attribute (`conv1 relu1 pool1 norm1 ... fc8`) so that unit addresses such as
"conv5:17" read like the paper. SqueezeNet keeps torchvision's module names so its published weights load
as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["ConvNet", "zfnet", "alexnet", "squeezenet1_1", "SqueezeNet", "TABLE3_VARIANTS"]


@dataclass(frozen=True)
class ConvNetConfig:
    """The knobs that distinguish ZFNet, AlexNet and the Table 3 variants."""

    num_classes: int = 1000
    widths: tuple = (96, 256, 384, 384, 256)  # conv1..conv5 feature maps (Fig. 3)
    conv1: tuple = (7, 2, 1)  # kernel, stride, padding: ZFNet's 7x7/2 (Sec. 4.1 fix of AlexNet's 11x11/4)
    conv2: tuple = (5, 2, 0)  # kernel, stride, padding: stride 2 in ZFNet, 1 in AlexNet
    groups: int = 1  # 2 = AlexNet's two-GPU connectivity on conv2, conv4, conv5
    fc: int = 4096  # fc6 / fc7 units (Table 3 tries 2048 and 8192)
    remove: tuple = ()  # layer numbers dropped for Table 3: (3, 4), (7,), (6, 7), (3, 4, 6, 7)
    norm: str = "after_pool"  # ZFNet normalizes after pooling; AlexNet before; "none" = torchvision
    dropout: float = 0.5  # on fc6 and fc7 (Sec. 3)
    avgpool: bool = False  # torchvision AlexNet's adaptive 6x6 pool, so any input size reaches fc6
    input_size: int = 224  # fc6's input follows from it; small sizes make CPU-scale runs possible


class ConvNet(nn.Module):
    """ZFNet / AlexNet family: five conv layers, three fully connected, named as in the paper."""

    def __init__(self, cfg: ConvNetConfig = ConvNetConfig()):
        super().__init__()
        self.cfg = cfg
        c1, c2, c3, c4, c5 = cfg.widths
        keep = lambda n: n not in cfg.remove  # noqa: E731
        k1, s1, p1 = cfg.conv1
        k2, s2, p2 = cfg.conv2
        g = cfg.groups
        lrn = lambda: nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)  # noqa: E731
        order: list[str] = []

        def add(name, module):
            setattr(self, name, module)
            order.append(name)

        # Layer 1. ZFNet: (N, 96, 110, 110) -> pool (N, 96, 55, 55). AlexNet: (N, 96, 55, 55) -> 27x27.
        add("conv1", nn.Conv2d(3, c1, k1, s1, p1))
        add("relu1", nn.ReLU())
        if cfg.norm == "before_pool":
            add("norm1", lrn())
        add("pool1", nn.MaxPool2d(3, 2, ceil_mode=True))
        if cfg.norm == "after_pool":
            add("norm1", lrn())
        # Layer 2. ZFNet: (N, 256, 26, 26) -> pool (N, 256, 13, 13). AlexNet: 27x27 -> 13x13.
        add("conv2", nn.Conv2d(c1, c2, k2, s2, p2, groups=g))
        add("relu2", nn.ReLU())
        if cfg.norm == "before_pool":
            add("norm2", lrn())
        add("pool2", nn.MaxPool2d(3, 2, ceil_mode=True))
        if cfg.norm == "after_pool":
            add("norm2", lrn())
        # Layers 3-5: (N, 384|384|256, 13, 13), 3x3 pad 1; conv3 is dense even in two-group AlexNet.
        cin = c2
        if keep(3):
            add("conv3", nn.Conv2d(cin, c3, 3, 1, 1))
            add("relu3", nn.ReLU())
            cin = c3
        if keep(4):
            add("conv4", nn.Conv2d(cin, c4, 3, 1, 1, groups=g))
            add("relu4", nn.ReLU())
            cin = c4
        add("conv5", nn.Conv2d(cin, c5, 3, 1, 1, groups=g))
        add("relu5", nn.ReLU())
        add("pool5", nn.MaxPool2d(3, 2, ceil_mode=True))  # (N, 256, 6, 6)
        if cfg.avgpool:
            add("avgpool", nn.AdaptiveAvgPool2d((6, 6)))
        add("flatten", nn.Flatten(1))  # (N, 9216)
        with torch.no_grad():  # fc6's fan-in for this input size (9216 at 224)
            x = torch.zeros(1, 3, cfg.input_size, cfg.input_size)
            for name in order:
                x = getattr(self, name)(x)
        cin = x.shape[1]
        for n in (6, 7):
            if keep(n):
                add(f"fc{n}", nn.Linear(cin, cfg.fc))  # (N, 4096)
                add(f"relu{n}", nn.ReLU())
                add(f"drop{n}", nn.Dropout(cfg.dropout))
                cin = cfg.fc
        add("fc8", nn.Linear(cin, cfg.num_classes))  # (N, C) class scores; softmax lives in the loss
        self.order = tuple(order)
        self.feature_layers = tuple(f"relu{n}" for n in (1, 2, 3, 4, 5) if hasattr(self, f"relu{n}"))
        self.reset_parameters()

    def reset_parameters(self):
        """Sec. 3: weights N(0, 1e-2), biases 0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 1e-2)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.order:
            x = getattr(self, name)(x)
        return x


# Table 3 of the paper, as arguments of zfnet().
TABLE3_VARIANTS: dict[str, dict] = {
    "zfnet": {},
    "remove-3-4": {"remove": (3, 4)},
    "remove-7": {"remove": (7,)},
    "remove-6-7": {"remove": (6, 7)},
    "remove-3-4-6-7": {"remove": (3, 4, 6, 7)},
    "fc-2048": {"fc": 2048},
    "fc-8192": {"fc": 8192},
    "conv-512-1024-512": {"widths": (96, 256, 512, 1024, 512)},
    "fc-8192-conv-512-1024-512": {"fc": 8192, "widths": (96, 256, 512, 1024, 512)},
}


def zfnet(num_classes: int = 1000, *, widths=(96, 256, 384, 384, 256), fc: int = 4096, remove=(),
          dropout: float = 0.5, input_size: int = 224) -> ConvNet:
    """ZFNet exactly as Fig. 3 (224x224 input); arguments give the Table 3 variants and small CPU-scale nets."""
    return ConvNet(ConvNetConfig(num_classes=num_classes, widths=tuple(widths), fc=fc,
                                 remove=tuple(remove), dropout=dropout, input_size=input_size))


def alexnet(num_classes: int = 1000, *, groups: int = 1, layout: str = "paper", widths=None,
            fc: int = 4096, remove=(), dropout: float = 0.5, input_size: int = 224) -> ConvNet:
    """AlexNet (Krizhevsky 2012), the paper's baseline.

    Args:
        groups: 1 = dense; 2 = the original two-GPU connectivity of conv2, conv4, conv5.
        layout: "paper" (96-256-384-384-256 with LRN) or "torchvision" (64-192-384-256-256, no LRN,
            adaptive 6x6 pool) so torchvision's published weights load.
    """
    if layout == "torchvision":
        cfg = ConvNetConfig(num_classes, tuple(widths or (64, 192, 384, 256, 256)), (11, 4, 2), (5, 1, 2),
                            groups, fc, tuple(remove), "none", dropout, avgpool=True, input_size=input_size)
    elif layout == "paper":
        cfg = ConvNetConfig(num_classes, tuple(widths or (96, 256, 384, 384, 256)), (11, 4, 2), (5, 1, 2),
                            groups, fc, tuple(remove), "before_pool", dropout, input_size=input_size)
    else:
        raise ValueError(f"layout must be 'paper' or 'torchvision', not {layout!r}")
    return ConvNet(cfg)


# torchvision's AlexNet state-dict keys -> ours.
ALEXNET_TORCHVISION_KEYS = {"features.0": "conv1", "features.3": "conv2", "features.6": "conv3",
                            "features.8": "conv4", "features.10": "conv5", "classifier.1": "fc6",
                            "classifier.4": "fc7", "classifier.6": "fc8"}


# ----------------------------------------------------------------------------------------------------
class Fire(nn.Module):
    """SqueezeNet's Fire module; names match torchvision so its weights load strictly."""

    def __init__(self, cin: int, squeeze: int, e1: int, e3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1 (Iandola et al. 2016) with torchvision's layout and parameter names."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(inplace=True), pool(),  # 0-2: (N, 64, 55, 55)
            Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), pool(),  # 3-5: (N, 128, 27, 27)
            Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), pool(),  # 6-8: (N, 256, 13, 13)
            Fire(256, 48, 192, 192), Fire(384, 48, 192, 192),  # 9-10: (N, 384, 13, 13)
            Fire(384, 64, 256, 256), Fire(512, 64, 256, 256),  # 11-12: (N, 512, 13, 13)
        )
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Conv2d(512, num_classes, 1),
                                        nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1)))
        # Rectified conv outputs, shallow to deep: the paper's "feature maps" of this network.
        self.feature_layers = ("features.1", "features.3", "features.4", "features.6", "features.7",
                               "features.9", "features.10", "features.11", "features.12")

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


def squeezenet1_1(num_classes: int = 1000) -> SqueezeNet:
    return SqueezeNet(num_classes)

