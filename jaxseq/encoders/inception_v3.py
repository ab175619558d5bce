"""InceptionV3 in JAX (the chapter's image encoder), loading Keras ``.h5`` ImageNet weights the user downloaded.

The network follows ``keras.applications.InceptionV3`` exactly: 94 ``conv2d_bn`` units (conv without bias,
batch norm without scale, epsilon 1e-3, ReLU), max pools, "same" average pools that ignore the padding, and
the 11 ``mixed`` concatenations, ending in the 2,048-d global average the chapter feeds its caption model.

The parameters are a list of the 94 units *in the order Keras creates them* (the order of the
``conv2d_bn`` calls in its source), so :func:`apply` consumes them one by one. Weight files list layers in
another order, Keras' topological one, which interleaves the branches; :func:`keras_layer_order` recomputes
it from the same network description, so no layer name is trusted.

Weights: the user downloads them once (no code here downloads anything), for example
``inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5`` (features only) or
``inception_v3_weights_tf_dim_ordering_tf_kernels.h5`` (with the 1000-class top) from
https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/ . Also read: Keras 3
``.weights.h5`` (``model.save_weights``), whole-model ``.keras`` archives and Keras 2 ``model.save`` ``.h5``.

Input ``[batch, 299, 299, 3]`` RGB scaled by :func:`preprocess` to [-1, 1]. Outputs (``output=``):
``"pooled"`` ``[batch, 2048]``, ``"grid"`` ``[batch, 8, 8, 2048]`` (``mixed10``), ``"logits"``
``[batch, 1000]`` (needs the top weights; Keras applies softmax after these).

References:
  Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", CVPR 2016.
"""
from __future__ import annotations

import io
import os
import re
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

NAME = "inception_v3"
IMAGE_SIZE = 299
FEATURE_DIM = 2048
GRID_SIZE = 8
NUM_CLASSES = 1000
NUM_CONVS = 94
BN_EPSILON = 1e-3
WEIGHTS_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
               "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5")


def preprocess(images: np.ndarray | jax.Array) -> jax.Array:
    """``uint8 [batch, 299, 299, 3]`` RGB -> float32 in [-1, 1], as Keras' ``inception_v3.preprocess_input``."""
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


class _ArrayOps:
    """Evaluates the network on arrays, handing out the conv-bn units in creation order."""

    def __init__(self, convs):
        self._convs = convs
        self._next = 0

    def conv_bn(self, x, filters, kh, kw, strides=1, padding="SAME"):
        p = self._convs[self._next]
        if tuple(p["kernel"].shape) != (kh, kw, x.shape[-1], filters):
            raise ValueError(f"InceptionV3 conv unit {self._next}: kernel shape {tuple(p['kernel'].shape)}, "
                             f"expected {(kh, kw, x.shape[-1], filters)}")
        self._next += 1
        y = jax.lax.conv_general_dilated(x, p["kernel"], (strides, strides), padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = (y - p["mean"]) * jax.lax.rsqrt(p["var"] + BN_EPSILON) + p["beta"]
        return jax.nn.relu(y)

    @staticmethod
    def max_pool(x):  # 3x3, stride 2, valid
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")

    @staticmethod
    def avg_pool(x):
        # 3x3, stride 1, "same": as in TensorFlow and Keras, padded zeros are not counted in the average.
        window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
        total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, "SAME")
        ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
        return total / jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, "SAME")

    @staticmethod
    def cat(*xs):
        return jnp.concatenate(xs, axis=-1)


class _Node:
    def __init__(self, kind: str, inputs: tuple, unit: int | None = None):
        self.kind, self.inputs, self.unit = kind, inputs, unit


class _GraphOps:
    """Records the network as Keras sees it (conv, batch norm and activation are three layers) to find
    the order Keras lists its layers in, which is the order of the weights in its files."""

    def __init__(self):
        self._units = 0

    def conv_bn(self, x, filters, kh, kw, strides=1, padding="SAME"):
        del filters, kh, kw, strides, padding
        unit, self._units = self._units, self._units + 1
        return _Node("relu", (_Node("bn", (_Node("conv", (x,), unit),), unit),))

    @staticmethod
    def max_pool(x):
        return _Node("max_pool", (x,))

    @staticmethod
    def avg_pool(x):
        return _Node("avg_pool", (x,))

    @staticmethod
    def cat(*xs):
        return _Node("concat", xs)


def _features(ops, x):
    """The convolutional trunk, ``[batch, 299, 299, 3]`` -> ``mixed10`` ``[batch, 8, 8, 2048]``, written
    in the order of the ``conv2d_bn`` calls in ``keras.applications.inception_v3``."""
    c = ops.conv_bn
    x = c(x, 32, 3, 3, strides=2, padding="VALID")
    x = c(x, 32, 3, 3, padding="VALID")
    x = c(x, 64, 3, 3)
    x = ops.max_pool(x)
    x = c(x, 80, 1, 1, padding="VALID")
    x = c(x, 192, 3, 3, padding="VALID")
    x = ops.max_pool(x)

    # mixed0, mixed1, mixed2: 35x35; the pool branch has 32 filters in mixed0 and 64 afterwards.
    for pool_filters in (32, 64, 64):
        b1 = c(x, 64, 1, 1)
        b5 = c(c(x, 48, 1, 1), 64, 5, 5)
        b3 = c(c(c(x, 64, 1, 1), 96, 3, 3), 96, 3, 3)
        bp = c(ops.avg_pool(x), pool_filters, 1, 1)
        x = ops.cat(b1, b5, b3, bp)

    # mixed3: reduction to 17x17.
    b3 = c(x, 384, 3, 3, strides=2, padding="VALID")
    bd = c(c(c(x, 64, 1, 1), 96, 3, 3), 96, 3, 3, strides=2, padding="VALID")
    x = ops.cat(b3, bd, ops.max_pool(x))

    # mixed4 .. mixed7: factorised 7x7 convolutions with 128, 160, 160, 192 inner filters.
    for inner in (128, 160, 160, 192):
        b1 = c(x, 192, 1, 1)
        b7 = c(c(c(x, inner, 1, 1), inner, 1, 7), 192, 7, 1)
        bd = c(x, inner, 1, 1)
        bd = c(c(c(c(bd, inner, 7, 1), inner, 1, 7), inner, 7, 1), 192, 1, 7)
        bp = c(ops.avg_pool(x), 192, 1, 1)
        x = ops.cat(b1, b7, bd, bp)

    # mixed8: reduction to 8x8.
    b3 = c(c(x, 192, 1, 1), 320, 3, 3, strides=2, padding="VALID")
    b7 = c(c(c(c(x, 192, 1, 1), 192, 1, 7), 192, 7, 1), 192, 3, 3, strides=2, padding="VALID")
    x = ops.cat(b3, b7, ops.max_pool(x))

    # mixed9, mixed10: expanded filter banks.
    for _ in range(2):
        b1 = c(x, 320, 1, 1)
        b3 = c(x, 384, 1, 1)
        b3 = ops.cat(c(b3, 384, 1, 3), c(b3, 384, 3, 1))
        bd = c(c(x, 448, 1, 1), 384, 3, 3)
        bd = ops.cat(c(bd, 384, 1, 3), c(bd, 384, 3, 1))
        bp = c(ops.avg_pool(x), 192, 1, 1)
        x = ops.cat(b1, b3, bd, bp)
    return x


def keras_layer_order() -> tuple[list[int], list[int]]:
    """Creation indices of the conv and of the batch-norm layers in the order Keras lists them.

    Keras (2 and 3) orders a functional model's layers by depth (longest path to the output, deepest
    first), ties broken by the order a depth-first walk from the output first meets them
    (``keras.src.ops.function.map_graph``). Weight files follow that order: legacy ``.h5`` files list
    ``layer_names`` in it and Keras loads them by position; Keras 3 ``.weights.h5`` names layers
    ``conv2d``, ``conv2d_1``, ... by it. Here the same walk runs over :func:`_features` recorded as a graph.
    """
    output = _features(_GraphOps(), _Node("input", ()))
    preorder: dict[int, int] = {}
    postorder: list[_Node] = []

    def walk(node):  # recursion depth stays under 400 nodes deep
        if id(node) in preorder:
            return
        preorder[id(node)] = len(preorder)
        for parent in node.inputs:
            walk(parent)
        postorder.append(node)

    walk(output)
    depth = {id(output): 0}
    for node in reversed(postorder):  # children before parents: longest path from the output
        for parent in node.inputs:
            depth[id(parent)] = max(depth.get(id(parent), 0), depth[id(node)] + 1)
    ordered = sorted(postorder, key=lambda n: (-depth[id(n)], preorder[id(n)]))
    return ([n.unit for n in ordered if n.kind == "conv"], [n.unit for n in ordered if n.kind == "bn"])


def apply(params: dict, images: jax.Array, *, output: str = "pooled") -> jax.Array:
    """Run InceptionV3 in inference mode (batch norm from its moving statistics).

    Args:
      params: from :func:`load_params` (``{"convs": [94 units], "predictions": {...}}``, top optional).
      images: ``[batch, 299, 299, 3]`` from :func:`preprocess` (any size >= 75 works for the trunk).
      output: ``"pooled"`` -> ``[batch, 2048]``; ``"grid"`` -> ``[batch, 8, 8, 2048]``;
        ``"logits"`` -> ``[batch, 1000]`` (pre-softmax; needs ``params["predictions"]``).
    """
    if output not in ("logits", "pooled", "grid"):
        raise ValueError(f"output={output!r}, expected 'logits', 'pooled' or 'grid'")
    if images.ndim != 4 or images.shape[-1] != 3 or min(images.shape[1:3]) < 75:
        raise ValueError(f"images has shape {images.shape}, expected [batch, height>=75, width>=75, 3]")
    if len(params["convs"]) != NUM_CONVS:
        raise ValueError(f"params['convs'] has {len(params['convs'])} units, expected {NUM_CONVS}")
    x = _features(_ArrayOps(params["convs"]), images)
    if output == "grid":
        return x
    pooled = jnp.mean(x, axis=(1, 2))
    if output == "pooled":
        return pooled
    if "predictions" not in params:
        raise ValueError("output='logits' needs the classifier weights: load the file with the top "
                         "(inception_v3_weights_tf_dim_ordering_tf_kernels.h5, not ..._notop.h5)")
    return pooled @ params["predictions"]["kernel"] + params["predictions"]["bias"]


def creation_index(name: str) -> int:
    """The number Keras appended to an auto-named layer (``conv2d_7`` -> 7, ``conv2d`` -> 0): its creation order."""
    match = re.search(r"_(\d+)$", name)
    return int(match.group(1)) if match else 0


def _read_layers(f) -> list[list[np.ndarray]]:
    """Weights of each layer that has any, in Keras' layer order, from a Keras 3 or legacy (Keras 2) h5."""
    if "layers" in f and "layer_names" not in f.attrs:
        # Keras 3 ``.weights.h5``: layers/<name>/vars/<0..n-1>, names numbered per class in layer order.
        groups = sorted(((name, group) for name, group in f["layers"].items()
                         if "vars" in group and len(group["vars"])),
                        key=lambda item: (creation_index(item[0]), item[0]))
        return [[np.asarray(g["vars"][str(i)]) for i in range(len(g["vars"]))] for _, g in groups]
    root = f["model_weights"] if "model_weights" in f else f
    if "layer_names" not in root.attrs:
        raise ValueError("not a Keras weights file: no 'layers' group and no 'layer_names' attribute")
    out = []
    for raw in root.attrs["layer_names"]:
        group = root[raw.decode() if isinstance(raw, bytes) else str(raw)]
        weight_names = [w.decode() if isinstance(w, bytes) else str(w) for w in group.attrs.get("weight_names", [])]
        if weight_names:
            out.append([np.asarray(group[w]) for w in weight_names])
    return out


def params_from_keras_layers(layers: list[list[np.ndarray]]) -> dict:
    """Map Keras layer weights, in Keras' layer order, to the params pytree (units in creation order).

    A layer with one 4-d array is a conv (kernel), with three 1-d arrays a batch norm (beta, moving mean,
    moving variance; Keras' InceptionV3 has no gamma), with a 2-d and a 1-d array the classifier.
    """
    convs = [w[0] for w in layers if len(w) == 1 and w[0].ndim == 4]
    bns = [w for w in layers if len(w) == 3 and all(a.ndim == 1 for a in w)]
    dense = [w for w in layers if len(w) == 2 and w[0].ndim == 2]
    if len(convs) != NUM_CONVS or len(bns) != NUM_CONVS or len(dense) > 1 \
            or len(convs) + len(bns) + len(dense) != len(layers):
        raise ValueError(f"InceptionV3 weights: found {len(convs)} conv, {len(bns)} batch-norm (beta, mean, "
                         f"variance), {len(dense)} dense and {len(layers) - len(convs) - len(bns) - len(dense)} "
                         f"other layers; expected {NUM_CONVS} conv, {NUM_CONVS} batch-norm and at most 1 dense "
                         "(is this a Keras InceptionV3 file?)")
    conv_order, bn_order = keras_layer_order()
    units: list[dict] = [{} for _ in range(NUM_CONVS)]
    for unit, kernel in zip(conv_order, convs):
        units[unit]["kernel"] = kernel
    for unit, (beta, mean, var) in zip(bn_order, bns):
        if not beta.shape == mean.shape == var.shape == units[unit]["kernel"].shape[-1:]:
            raise ValueError(f"InceptionV3 weights: batch norm of unit {unit} has shapes {beta.shape}, "
                             f"{mean.shape}, {var.shape}; its conv kernel is {units[unit]['kernel'].shape}")
        units[unit].update(beta=beta, mean=mean, var=var)
    params = {"convs": units}
    if dense:
        kernel, bias = dense[0]
        if kernel.shape != (FEATURE_DIM, NUM_CLASSES) or bias.shape != (NUM_CLASSES,):
            raise ValueError(f"InceptionV3 weights: classifier {kernel.shape}/{bias.shape}, "
                             f"expected ({FEATURE_DIM}, {NUM_CLASSES})/({NUM_CLASSES},)")
        params["predictions"] = {"kernel": kernel, "bias": bias}
    return params


def load_params(path: str | os.PathLike) -> dict:
    """Read InceptionV3 weights from a Keras file (``.h5`` download, ``.weights.h5`` or ``.keras``).

    Reading is plain HDF5 through h5py (no pickle, no code). Shapes are checked unit by unit on first use.

    Raises:
        FileNotFoundError: no such file (the message says where the ImageNet weights can be downloaded).
        ValueError: the file is not a Keras InceptionV3 weights file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"InceptionV3 weights {path!r} not found; download the Keras ImageNet weights "
                                f"once, e.g. {WEIGHTS_URL}, and pass that file")
    try:
        import h5py  # optional dependency: only this loader needs it
    except ImportError as error:
        raise ImportError("reading Keras weights needs h5py: pip install h5py (or 'jaxseq[pretrained]')") from error

    if zipfile.is_zipfile(path):  # a ``.keras`` archive holds model.weights.h5
        with zipfile.ZipFile(path) as archive:
            if "model.weights.h5" not in archive.namelist():
                raise ValueError(f"{path}: a .keras archive without model.weights.h5")
            with h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as f:
                layers = _read_layers(f)
    else:
        try:
            f = h5py.File(path, "r")
        except OSError as error:
            raise ValueError(f"{path}: not an HDF5 file ({error})") from None
        with f:
            layers = _read_layers(f)
    params = params_from_keras_layers(layers)
    # Shapes of every unit are known only by walking the network; do it once now, abstractly (no FLOPs).
    jax.eval_shape(lambda p: apply(p, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)), output="pooled"), params)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
