"""PCA colour augmentation, "lighting" (Krizhevsky et al. 2012, Sec. 4.1), for the training recipe.

The statistics are the eigenvectors p_i and eigenvalues lambda_i of the 3x3 covariance of the RGB values of
every pixel of the training set; each training image then gets the same colour shift
sum_i alpha_i * lambda_i * p_i added to every pixel, with alpha_i ~ N(0, std) (std 0.1 in the paper) drawn
once per image per epoch. Pixel values are on zfnet's [0, 1] scale (the paper does not give its scale; on
a 0..255 scale the same formula shifts by hundreds of levels), the scale on which reimplementations such as
fb.resnet.torch's Lighting transform quote ImageNet's eigenvalues (0.2175, 0.0188, 0.0045).

alpha for image i in epoch e comes from a generator seeded by (seed, e, i) only, so it is the same in any
process or DataLoader worker and after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Lighting", "rgb_moments", "covariance"]


def rgb_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(N, 3, H, W) or (3, H, W) pixels -> (sum (3,), sum of outer products (3, 3), pixel count), float64:
    the sufficient statistics of the RGB covariance, which add up over batches and torchrun processes."""
    flat = x.detach().double().transpose(0, 1).reshape(3, -1) if x.dim() == 4 else x.double().reshape(3, -1)
    return flat.sum(1), flat @ flat.T, flat.shape[1]


def covariance(total: torch.Tensor, outer: torch.Tensor, n: int) -> torch.Tensor:
    """The (population) covariance of the pixels whose `rgb_moments` were summed."""
    mean = total / n
    return outer / n - torch.outer(mean, mean)


@dataclass(frozen=True)
class Lighting:
    """The PCA colour shift of Sec. 4.1 for one training set.

    eigval: (3,) descending; eigvec: (3, 3) float64, column i is p_i, signed so that its largest component is
    positive (eigh's sign is arbitrary; a fixed sign keeps a given alpha's shift the same on every machine).
    """

    eigval: torch.Tensor
    eigvec: torch.Tensor
    std: float = 0.1

    @classmethod
    def from_covariance(cls, cov: torch.Tensor, std: float = 0.1) -> "Lighting":
        val, vec = torch.linalg.eigh(cov.double())
        val, vec = val.flip(0).clamp_min(0.0), vec.flip(1)  # descending; rounding can give -1e-18
        big = vec.abs().argmax(0)
        vec = vec * torch.sign(vec[big, torch.arange(3)])
        return cls(val, vec, float(std))

    def shift(self, alpha: torch.Tensor) -> torch.Tensor:
        """(3,) alpha -> the RGB shift sum_i alpha_i * lambda_i * p_i, float32."""
        return (self.eigvec @ (alpha.double() * self.eigval)).float()

    def alpha(self, seed: int, epoch: int, index: int) -> torch.Tensor:
        """alpha ~ N(0, std)^3 for image `index` in `epoch`: a function of (seed, epoch, index) alone."""
        # 2**62 + ...: never the seed of the same image's random crop (zfnet.data.trainset), so turning
        # lighting on leaves every crop and flip as it was
        g = torch.Generator().manual_seed(2**62 + ((seed * 1_000_003 + epoch) * 1_000_003 + index) % 2**62)
        return torch.randn(3, generator=g, dtype=torch.float64) * self.std

    def __call__(self, x: torch.Tensor, seed: int, epoch: int, index: int) -> torch.Tensor:
        """(3, H, W) image -> the image with its shift for (seed, epoch, index) added to every pixel."""
        return x + self.shift(self.alpha(seed, epoch, index)).to(x.dtype).view(3, 1, 1)

    def to_dict(self) -> dict:
        return {"eigval": self.eigval, "eigvec": self.eigvec, "std": self.std}
