"""Data for amalgam: DataModules that yield uint8 images and convert/augment them on the device.

Batch contract (as the LightningModule sees it, after `on_after_batch_transfer`):
- unlabeled train batch: float images [B, 3, H, W] in [0, 1], nothing else;
- validation/test: one dataloader per task, in `datamodule.task_names` order, batches
  `(images, labels)` with label = index into `datamodule.task_classes[task]`;
- predict: `(images, indices)`.
"""

from amalgam.data.augment import random_crop_flip, to_float
from amalgam.data.base import AmalgamDataModule
from amalgam.data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNISTDataModule
from amalgam.data.image_files import IMAGE_EXTENSIONS, scan_images
from amalgam.data.image_folder import ImageFolderDataModule

__all__ = [
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "AmalgamDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "random_crop_flip",
    "scan_images",
    "to_float",
]
