"""The ImageNet normalization every InternVL 1.0 model expects (spec 1.2), in one place."""

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN_255 = np.asarray(IMAGENET_MEAN, np.float32) * 255
_INV_STD_255 = 1.0 / (np.asarray(IMAGENET_STD, np.float32) * 255)


def normalize_images(images: np.ndarray) -> np.ndarray:
  """RGB images in [0, 255] (uint8 or float), channels last, to ImageNet-normalized float32."""
  images = np.asarray(images)
  if images.shape[-1] != 3:
    raise ValueError(f"images must be RGB with channels last; got shape {images.shape}.")
  return (images.astype(np.float32) - _MEAN_255) * _INV_STD_255
