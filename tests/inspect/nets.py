"""Small torchvision-style ResNets for the layer tests: blocks that call one ReLU module twice."""

import torch
import torch.nn as nn


class Block(nn.Module):
    """torchvision's BasicBlock: one ReLU module called twice, `out += identity` into bn2's output."""

    def __init__(self, cin, cout, stride=1, inplace=True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) \
            if stride > 1 or cin != cout else None

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(Block(6, 6), Block(6, 6))
        self.layer2 = nn.Sequential(Block(6, 8, 2), Block(8, 8))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)
        self.double().eval()

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinySE(nn.Module):
    """MobileNetV3's pattern in small: conv, squeeze-and-excitation gate, conv; fields past the gate are the
    whole image exactly and 3 + 2 = 5 pixels locally."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, 1, 1)
        self.act1 = nn.ReLU()
        self.fc1, self.fc2 = nn.Conv2d(6, 2, 1), nn.Conv2d(2, 6, 1)
        self.conv2 = nn.Conv2d(6, 6, 3, 2, 1)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(6, 3)
        self.eval()

    def forward(self, x):
        x = self.act1(self.conv1(x))
        x = x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        x = self.act2(self.conv2(x))
        return self.head(x.mean((2, 3)))
