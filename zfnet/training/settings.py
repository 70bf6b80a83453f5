"""What a training run does: `TrainConfig`, and the two papers' recipes, each stated once with its sections.

`RECIPES["zfnet"]` is Zeiler & Fergus 2013, Sec. 3 (TrainConfig's defaults); `RECIPES["alexnet"]` is
Krizhevsky, Sutskever & Hinton 2012, Secs. 3-5, the baseline ZFNet improves on. `TrainConfig.recipe(name,
**overrides)` starts from a recipe; the overrides (and on the command line, the flags given explicitly)
win. Settings that neither paper states keep zfnet's choice and are marked so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..core.errors import ZfnetError

__all__ = ["TrainConfig", "RECIPES"]

RECIPES: dict[str, dict] = {
    # Zeiler & Fergus 2013, "Visualizing and Understanding Convolutional Networks".
    "zfnet": {
        "model": "zfnet",  # Sec. 3, Fig. 3: conv1 7x7 stride 2, conv2 stride 2 (Sec. 4.1's fix of AlexNet)
        "resize": 256, "crop": 224, "flip": True,  # Sec. 3: shorter side 256, centre 256x256, 224 sub-crops + flips
        "val_crops": "ten",  # Sec. 3: 10 sub-crops (corners + centre, with and without flips)
        "batch_size": 128, "lr": 1e-2, "momentum": 0.9,  # Sec. 3: SGD, mini-batch 128, lr 1e-2, momentum 0.9
        "weight_decay": 0.0,  # not stated in Sec. 3
        "lr_factor": 0.1, "lr_drops": None,  # Sec. 3: lr annealed "manually when the validation error
        "lr_patience": 3,  # plateaus" (how far and how often: not stated; zfnet: x0.1 after 3 epochs)
        "epochs": 70,  # Sec. 3: "we stopped training after 70 epochs"
        "dropout": 0.5,  # Sec. 3: dropout 0.5 in fully connected layers 6 and 7
        "init_std": 1e-2, "bias_one": (),  # Sec. 3: "all weights are initialized to 1e-2 and biases set to 0"
        "clip_radius": 0.1,  # Sec. 3: conv filters whose RMS exceeds 1e-1 renormalized to it
        "lighting": 0.0,  # no colour augmentation in Sec. 3
    },
    # Krizhevsky, Sutskever & Hinton 2012, "ImageNet Classification with Deep Convolutional Neural Networks".
    "alexnet": {
        "model": "alexnet",  # Sec. 3.5, Fig. 2 (conv1 11x11 stride 4), dense; alexnet2 = the two-GPU groups
        "resize": 256, "crop": 224, "flip": True,  # Sec. 2 + 4.1: 256x256 images, random 224 patches + reflections
        "val_crops": "ten",  # Sec. 4.1: softmax averaged over the 4 corner + centre patches and their reflections
        "batch_size": 128, "lr": 1e-2, "momentum": 0.9,  # Sec. 5: batch 128, momentum 0.9, lr 0.01 in all layers
        "weight_decay": 5e-4,  # Sec. 5: weight decay 0.0005
        "lr_factor": 0.1, "lr_drops": 3,  # Sec. 5: lr / 10 "when the validation error rate stopped improving",
        "lr_patience": 3,  # "reduced three times prior to termination" (patience not stated; zfnet: 3 epochs)
        "epochs": 90,  # Sec. 5: "roughly 90 cycles through the training set"
        "dropout": 0.5,  # Sec. 4.2: dropout 0.5 in the first two fully connected layers
        "init_std": 1e-2,  # Sec. 5: weights N(0, 0.01)
        "bias_one": ("conv2", "conv4", "conv5", "fc6", "fc7"),  # Sec. 5: biases 1 there, 0 elsewhere
        "clip_radius": 0.0,  # no feature scale clipping (ZF's addition)
        "lighting": 0.1,  # Sec. 4.1: PCA colour shift, alpha_i ~ N(0, 0.1) per image per epoch
    },
}


@dataclass
class TrainConfig:
    """One training run. Defaults are Zeiler & Fergus's recipe (RECIPES["zfnet"], whose comments give the
    paper's sections); `TrainConfig.recipe("alexnet", ...)` starts from Krizhevsky et al.'s instead."""

    # what to train
    model: str = "zfnet"  # "zfnet", "alexnet" (11x11/4 baseline), "alexnet2" (two groups), or a Table 3 variant
    widths: tuple | None = None  # conv1..conv5 maps; None = the paper's 96-256-384-384-256 (Fig. 3)
    fc: int | None = None  # fc6/fc7 units; None = 4096 (Fig. 3)
    dropout: float = 0.5
    init_std: float = 1e-2  # weights N(0, init_std). 0 = He normal (std sqrt(2 / fan_in)): at reduced width
    #                         N(0, 1e-2) shrinks the signal ~1e5-fold over 8 layers
    bias_one: tuple = ()  # layers whose biases start at 1 (AlexNet: conv2, conv4, conv5, fc6, fc7); others 0
    # data
    data: str = ""  # image folder: class subfolders, or train/ + val/ inside (ImageNet layout)
    val_data: str | None = None  # validation folder (default: data/val, or the rest of a per-class split)
    train_per_class: int | None = None  # take this many images per class for training, the rest for validation
    split_seed: int = 0  # which images the per-class split takes
    resize: int = 256  # shorter side to this, then the central resize x resize square
    crop: int = 224  # sub-crops of this size
    flip: bool = True  # horizontal flips of the training crops
    lighting: float = 0.0  # PCA colour augmentation: std of alpha_i (AlexNet 0.1); 0 = off
    val_crops: str = "ten"  # "ten": softmax averaged over the 10 crops (corners + centre, flipped); or "center"
    epoch_val_crops: str | None = None  # crops of the per-epoch (plateau) evaluations; None = val_crops.
    #                                     "center" is 10x cheaper; the last epoch always uses val_crops
    cache: bool = False  # keep the decoded resize x resize images in memory (small data sets: decode once)
    workers: int = 0  # DataLoader worker processes
    # optimization
    epochs: int = 70
    batch_size: int = 128  # global: split across torchrun processes
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_factor: float = 0.1  # the learning rate is multiplied by this when the validation error plateaus:
    lr_patience: int = 3  # after this many epochs without a new best top-1 error
    lr_drops: int | None = None  # at most this many times (AlexNet: 3); None = no limit
    clip_radius: float = 0.1  # feature scale clipping: conv filters with RMS > radius renormalized to it
    #                           after every step; 0 = off (AlexNet, and the Fig. 6 / Table 3 ablation)
    # machinery
    out: str = "runs/zfnet"  # run folder: checkpoint.pth, epoch_NNN.pth, metrics.json, train_stats.pth
    snapshots: bool = True  # keep a model-only epoch_NNN.pth every epoch (Fig. 4 reads them)
    seed: int = 0
    device: str | None = None  # default: cuda if available (LOCAL_RANK picks the GPU under torchrun)
    amp: bool = True  # CUDA only: float16 autocast + gradient scaling
    channels_last: bool = True  # CUDA only: NHWC memory layout (faster convolutions on tensor cores)
    threads: int | None = None  # torch CPU threads per process (default: torch's choice)
    progress: bool = True
    budget_minutes: float = 0.0  # stop after the epoch expected to cross this wall time (0 = no limit);
    #                              a later call resumes. For CPU-scale runs on shared machines.

    def __post_init__(self):
        if self.widths is not None:
            self.widths = tuple(int(w) for w in self.widths)
        self.bias_one = tuple(str(n) for n in self.bias_one)

    @classmethod
    def recipe(cls, name: str = "zfnet", **overrides) -> "TrainConfig":
        """The paper's recipe `name` ("zfnet" or "alexnet", see RECIPES), with `overrides` applied.

        Args:
            name: which paper's settings to start from.
            overrides: any TrainConfig field; these win over the recipe.
        """
        if name not in RECIPES:
            raise ZfnetError(f"unknown recipe {name!r}; use one of {', '.join(RECIPES)}")
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ZfnetError(f"unknown training setting(s) {', '.join(unknown)}")
        return cls(**{**RECIPES[name], **overrides})

    def arch(self, num_classes: int) -> dict:
        """What `build_model` needs to rebuild this network (stored in every checkpoint)."""
        return {"model": self.model, "widths": list(self.widths) if self.widths else None, "fc": self.fc,
                "dropout": self.dropout, "num_classes": num_classes, "crop": self.crop, "resize": self.resize,
                "init_std": self.init_std, "bias_one": list(self.bias_one)}
