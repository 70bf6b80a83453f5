"""Gradient steps on an image: what reconstruction from codes, adversarial examples and fooling images share.

The model is frozen while an image is optimised (eval mode, no parameter gradients: only the image gets
one), and Adam is written out on the one image tensor: torch.optim's first use imports torch._dynamo,
which takes longer than these few-hundred-step optimisations of one image.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["Adam", "frozen"]


class frozen:  # noqa: N801 -- a context manager, named like torch.no_grad
    """Eval mode and no parameter gradients inside the block; the model's modes and flags are restored after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.training = self.model.training
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.eval()
        for p in self.params:
            p.requires_grad_(False)
        return self.model

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)
        self.model.train(self.training)


class Adam:
    """Adam (Kingma & Ba 2015) on one tensor, updated in place: `step(grad, lr)`."""

    def __init__(self, x: torch.Tensor, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.x, self.b1, self.b2, self.eps = x, betas[0], betas[1], eps
        self.m = torch.zeros_like(x)
        self.v = torch.zeros_like(x)
        self.t = 0

    @torch.no_grad()
    def step(self, grad: torch.Tensor, lr: float):
        self.t += 1
        self.m.mul_(self.b1).add_(grad, alpha=1 - self.b1)
        self.v.mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
        m_hat = self.m / (1 - self.b1 ** self.t)
        v_hat = self.v / (1 - self.b2 ** self.t)
        self.x.sub_(lr * m_hat / (v_hat.sqrt() + self.eps))
