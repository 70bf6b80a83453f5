"""Images to tensors: decoding, image folders, the paper's and torchvision's preprocessing, 10-crop
(`images`); the training-set side of Sec. 3 (`trainset`); the photos shipped with zfnet (`samples`).

May import zfnet.core only. The names below are the ones notebooks use (`from zfnet.data import ...`).
"""

from .images import (
                     IMAGE_EXTENSIONS,
                     IMAGENET_MEAN,
                     IMAGENET_STD,
                     Batches,
                     ImageDataset,
                     Preprocess,
                     collate,
                     list_images,
                     load_image,
                     ten_crop,
)

__all__ = ["IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "Batches", "ImageDataset", "Preprocess",
           "collate", "list_images", "load_image", "ten_crop"]
