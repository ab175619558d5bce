"""Image captioning: train on Flickr8k features or the embedded synthetic pictures, caption images.

    result = caption.train_and_evaluate(CaptionTaskConfig(), TrainConfig(out_dir="runs/c", epochs=15))
    run = caption.load_run("runs/c")
    caption.evaluate(run, split="dev", beam=3)          # BLEU-1..4 (+ CIDEr/ROUGE-L), attribute accuracy
    caption.predict(run, ["image.png"], beam=3)         # ["red circle at the top left", ...]

Training cleans the captions as the chapter does, builds the vocabulary from the training captions
(``min_count``, 10 for Flickr8k as in the chapter), trains by teacher forcing with ``jaxseq.training.fit``
(best checkpoint by dev BLEU-4), then captions the test images and writes ``metrics.json`` (BLEU-1..4 with all
references, greedy and beam; CIDEr/ROUGE-L with the ``caption-metrics`` extra) and ``test_captions.txt``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import numpy as np

from jaxseq import tasks

VOCAB_FILE = "vocab.json"
SYNTHETIC_SIZES = {"train": 2000, "dev": 200, "test": 300}

log = logging.getLogger("jaxseq.tasks.caption")


@dataclasses.dataclass(frozen=True)
class CaptionTaskConfig:
    """Data and model of a captioning run (the training hyper-parameters live in ``TrainConfig``)."""

    data: str = "synthetic"  # "synthetic" (embedded, drawn with Pillow) or the Flickr8k folder
    features: str | None = None  # Flickr8k: the .npz of ``jaxseq caption features``
    glove: str | None = None  # GloVe text file: frozen word embeddings (sets embed_dim)
    variant: str = "merge"  # merge | inject | attention (jaxseq.models.captioning)
    embed_dim: int = 200  # the chapter's GloVe 200-d
    hidden: int = 256  # the chapter's LSTM and dense widths
    dropout: float = 0.5  # on image features and word embeddings, as in the chapter
    min_count: int | None = None  # vocabulary threshold; None = 10 for Flickr8k (the chapter), 1 for synthetic
    synthetic_images: int = SYNTHETIC_SIZES["train"]  # training pictures; dev and test keep theirs unless larger
    beam: int = 3  # beam width of the final test report (besides greedy); 1 = greedy only


@dataclasses.dataclass
class Split:
    """Images of one split: ``ids``, ``features`` ``[N, ...]`` and raw reference ``captions`` (lists)."""

    ids: list
    features: object
    captions: list
    scenes: list | None = None  # synthetic only: the drawn attributes, for attribute accuracy


@dataclasses.dataclass(frozen=True)
class CaptionResult:
    """What ``train_and_evaluate`` measured (``metrics`` is also ``out_dir/metrics.json``)."""

    metrics: dict  # images, vocab_size, max_len, and the scores of "greedy" (and "beam<k>")
    captions: list  # (image id, greedy caption) of every test image, as in out_dir/test_captions.txt
    out_dir: pathlib.Path
    already_finished: bool  # the run folder held a finished run, which was scored again, not retrained


# --- data -------------------------------------------------------------------------------------------------------

def load_npz_features(path) -> tuple[dict, dict]:
    """``({image_id: features}, metadata)`` from a ``caption features`` file (``ids`` + ``features``)."""
    import zipfile

    from jaxseq.data.flickr8k import image_id

    path = pathlib.Path(path)
    what = f"features file {str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{what} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
        if not hasattr(data, "files"):  # a bare .npy array, not an archive
            raise ValueError("it holds a single array, not an .npz archive")
        with data:
            if "ids" not in data or "features" not in data:
                raise ValueError(f"{what} must hold arrays 'ids' and 'features', has {data.files}")
            ids, feats = [str(i) for i in data["ids"]], np.asarray(data["features"], np.float32)
            meta = {k: data[k].item() if data[k].ndim == 0 else None for k in data.files
                    if k not in ("ids", "features")}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        if str(error).startswith(what):
            raise
        raise ValueError(f"{what} is not a readable .npz made by 'jaxseq caption features' ({error})") from None
    if len(ids) != len(feats):
        raise ValueError(f"{what}: {len(ids)} ids but {len(feats)} feature rows")
    bad = [i for i, row in zip(ids, feats) if not np.isfinite(row).all()]
    if bad:
        raise ValueError(f"{what}: non-finite (NaN or inf) features for {len(bad)} image(s): "
                         f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}; re-make them with 'jaxseq "
                         "caption features'")
    return {image_id(i): f for i, f in zip(ids, feats)}, {k: v for k, v in meta.items() if v is not None}


def load_splits(source: dict) -> dict[str, Split]:
    """The three splits described by ``source`` (the run config's ``data`` entry). What a Flickr8k folder
    lacks or holds malformed is logged as warnings, once."""
    if source["kind"] == "synthetic":
        from jaxseq.data import synthetic_captions as sc

        out = {}
        for split, n in source["sizes"].items():
            data = sc.make(n, seed=source["seed"], split=split)
            out[split] = Split(data.ids, data.features, data.captions, data.scenes)
        return out
    from jaxseq.data import flickr8k

    table, _ = load_npz_features(source["features"])
    data = flickr8k.load(source["root"], available_ids=set(table))
    for line in data.report.lines():
        log.warning("flickr8k: %s", line)
    out = {}
    for split, caps in data.splits.items():
        ids = sorted(caps)
        if not ids:
            raise ValueError(f"no {split} image of {source['root']} has features in {source['features']}")
        out[split] = Split(ids, np.stack([table[i] for i in ids]), [caps[i] for i in ids])
    return out


def _model_features(features, variant: str, kind: str):
    """Synthetic pixels become a grid of patches for the attention variant; encoder features must be grids."""
    if variant == "attention" and features.ndim == 2:
        if kind != "synthetic":
            raise ValueError(f"variant 'attention' needs grid features [N, h, w, D], got {features.shape}; make "
                             "them with 'jaxseq caption features --grid'")
        from jaxseq.data import synthetic_captions as sc

        return sc.grid_features(features)
    return features


def _data_source(config: CaptionTaskConfig, seed: int) -> tuple[dict, int]:
    """The run config's ``data`` entry and the vocabulary threshold."""
    if config.data == "synthetic":
        if config.features:
            raise ValueError("features=FILE is for Flickr8k; the synthetic set computes its own pixel features")
        n = config.synthetic_images
        if n < 1:
            raise ValueError(f"synthetic_images must be >= 1, got {n}")
        source = {"kind": "synthetic", "seed": seed,
                  "sizes": {split: min(size, n) if split != "train" else n for split, size in SYNTHETIC_SIZES.items()}}
        return source, 1 if config.min_count is None else config.min_count
    root = pathlib.Path(config.data)
    if not root.is_dir():
        raise FileNotFoundError(f"data={config.data!r} is neither 'synthetic' nor a folder")
    if not config.features:
        raise ValueError("data=DIR needs features=FILE.npz; make it with 'jaxseq caption features --images "
                         "DIR/Flicker8k_Dataset --encoder efficientnet_lite0 --out FILE.npz'")
    source = {"kind": "flickr8k", "root": str(root.resolve()), "features": str(pathlib.Path(config.features).resolve())}
    return source, 10 if config.min_count is None else config.min_count


# --- a trained run ----------------------------------------------------------------------------------------------

class CaptionRun:
    """A trained run: model, params (the best checkpoint, by dev BLEU-4) and vocabulary; features in, captions
    out."""

    def __init__(self, run_dir):
        from jaxseq.data.vocab import Vocab
        from jaxseq.models import captioning as cap
        from jaxseq.training import restore_params

        run_dir = pathlib.Path(run_dir)
        self.run_config = tasks.run_config(run_dir, "caption")
        if not (run_dir / VOCAB_FILE).is_file():
            raise FileNotFoundError(f"run folder {str(run_dir)!r} has no {VOCAB_FILE}")
        self.run_dir = run_dir
        try:
            self.vocab = Vocab.from_json(json.loads((run_dir / VOCAB_FILE).read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
            raise ValueError(f"{run_dir / VOCAB_FILE} is not a saved vocabulary ({error})") from None
        self.model = cap.CaptionModel(cap.CaptionConfig(**self.run_config["model"]))
        shape = tuple(self.run_config["feature_shape"])
        self.params = restore_params(str(run_dir.resolve()), lambda k: cap.init_params(self.model, k, shape))
        self.max_len = self.run_config["max_len"]

    def caption(self, features, *, beam: int = 1, length_penalty: float = 0.6, batch_size: int = 256) -> list[str]:
        """Captions (strings) for ``features`` ``[N, ...]``, decoded in batches."""
        from jaxseq.models import captioning as cap

        if beam < 1:
            raise ValueError(f"beam must be >= 1, got {beam}")
        features = _model_features(np.asarray(features, np.float32), self.model.config.variant,
                                   self.run_config["data"]["kind"])
        out = []
        for lo in range(0, len(features), batch_size):
            chunk = features[lo:lo + batch_size]
            pad = batch_size - len(chunk) if len(features) > batch_size else 0  # one compiled shape
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
            tokens, _ = cap.generate(self.model, self.params, chunk, start=self.vocab.start_index,
                                     end=self.vocab.end_index, max_len=self.max_len,
                                     method="greedy" if beam == 1 else "beam", beam_size=beam,
                                     length_penalty=length_penalty)
            tokens = np.asarray(tokens)[:len(chunk) - pad]
            out.extend(" ".join(self.vocab.decode(row)) for row in tokens)
        return out


def load_run(run_dir) -> CaptionRun:
    """A run folder written by ``train_and_evaluate``.

    Raises:
      FileNotFoundError: no such folder, no checkpoint or no vocabulary. ValueError: another task's run.
    """
    return CaptionRun(run_dir)


def score(hypotheses: list[str], split: Split) -> dict:
    """BLEU-1..4 (and CIDEr/ROUGE-L when pycocoevalcap is installed) against cleaned references; on the
    synthetic set also the fraction of captions that get each drawn attribute right."""
    from jaxseq import metrics
    from jaxseq.data.text import clean_caption

    refs = [[clean_caption(c) for c in caps] for caps in split.captions]
    result = metrics.caption_bleu(hypotheses, refs)
    extra = metrics.caption_cider_rouge(hypotheses, refs)
    if extra is not None:
        result.update(extra)
    if split.scenes is not None:
        from jaxseq.data.synthetic_captions import attribute_accuracy

        result["attributes"] = attribute_accuracy(hypotheses, split.scenes)
    return result


def evaluate(run: CaptionRun, split: str = "test", *, beam: int = 1, length_penalty: float = 0.6) -> dict:
    """Scores of ``run`` on its own data's ``split`` (``"dev"`` or ``"test"``)."""
    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
    data = load_splits(run.run_config["data"])[split]
    hyps = run.caption(data.features, beam=beam, length_penalty=length_penalty)
    return {"split": split, "images": len(hyps), "beam": beam, **score(hyps, data)}


# --- training ---------------------------------------------------------------------------------------------------

def train_and_evaluate(config: CaptionTaskConfig, train_config, *, callbacks=()) -> CaptionResult:
    """Train a caption model with ``jaxseq.training.fit`` (best checkpoint by dev BLEU-4), then caption the test
    images greedily (and with beam ``config.beam``). Writes ``vocab.json``, ``loss.png``, ``metrics.json`` and
    ``test_captions.txt`` into ``train_config.out_dir``; a run found there resumes. ``callbacks``
    (``jaxseq.training.Callback``) go to ``fit``."""
    from jaxseq import metrics
    from jaxseq.data import glove as glove_lib
    from jaxseq.data.text import END, START, CaptionBatches, caption_vocab, clean_caption, wrap
    from jaxseq.models import captioning as cap
    from jaxseq.training import LambdaCallback, LossCurve, fit

    if config.beam < 1:
        raise ValueError(f"beam must be >= 1, got {config.beam}")
    source, min_count = _data_source(config, train_config.seed)
    splits = load_splits(source)
    train = splits["train"]
    texts = [[wrap(clean_caption(c)) for c in caps] for caps in train.captions]
    vocab = caption_vocab((t for caps in texts for t in caps), min_count=min_count)
    image_index = np.repeat(np.arange(len(texts)), [len(caps) for caps in texts])
    if any(w not in vocab for w in (START, END)) or len(vocab) <= 3:
        captions = sum(len(caps) for caps in texts)
        raise ValueError(f"min_count={min_count} leaves no caption word in the vocabulary: no word occurs "
                         f"{min_count} times in the {captions} training captions, so every caption became "
                         "empty; lower min_count")
    tokens = vocab.encode_batch([t for caps in texts for t in caps])
    if train_config.batch_size > len(tokens):
        raise ValueError(f"batch_size={train_config.batch_size} is larger than the {len(tokens)} training captions; "
                         f"use at most {len(tokens)}")
    max_len = tokens.shape[1] - 1  # words after startseq, endseq included (34 on Flickr8k, as the chapter)

    embedding = None
    embed_dim = config.embed_dim
    if config.glove:
        embedding, found = glove_lib.embedding_matrix(config.glove, vocab)
        embed_dim = embedding.shape[1]
        log.info("GloVe: %d of %d vocabulary words found; the rest are zero rows", found, len(vocab) - 1)
    model_config = cap.CaptionConfig(vocab_size=len(vocab), embed_dim=embed_dim, hidden=config.hidden,
                                     variant=config.variant, dropout=config.dropout,
                                     freeze_embedding=embedding is not None)
    model = cap.CaptionModel(model_config)
    train_features = _model_features(np.asarray(train.features, np.float32), config.variant, source["kind"])
    feature_shape = train_features.shape[1:]

    def init(key):
        return cap.init_params(model, key, feature_shape, embedding_matrix=embedding)

    def loss_fn(params, batch, key):
        return cap.caption_loss(model, params, batch, key)

    out = pathlib.Path(train_config.out_dir)
    dev = splits["dev"]
    dev_features = _model_features(np.asarray(dev.features, np.float32), config.variant, source["kind"])
    dev_refs = [[clean_caption(c) for c in caps] for caps in dev.captions]

    def evaluate_dev(params):
        toks, _ = cap.generate(model, params, dev_features, start=vocab.start_index, end=vocab.end_index,
                               max_len=max_len)
        hyps = [" ".join(vocab.decode(row)) for row in np.asarray(toks)]
        bleu = metrics.caption_bleu(hyps, dev_refs)
        return {"dev_bleu4": bleu["bleu4"], "dev_bleu1": bleu["bleu1"]}

    run_config = {"task": "caption", "data": source, "model": dataclasses.asdict(model_config),
                  "feature_shape": list(feature_shape), "max_len": int(max_len), "min_count": min_count,
                  "glove": str(pathlib.Path(config.glove).resolve()) if config.glove else None}
    if train_config.best_metric is None:
        train_config = dataclasses.replace(train_config, best_metric="dev_bleu4", best_mode="max")
    batches = CaptionBatches(train_features, image_index, tokens, train_config.batch_size, seed=train_config.seed)
    fitted = fit(train_config, init_params=init, loss_fn=loss_fn, train=batches, evaluate=evaluate_dev,
                 run_config=run_config,
                 callbacks=[  # the vocabulary is written once fit holds the folder and has accepted it
                     LambdaCallback(on_train_begin=lambda folder, step: (folder / VOCAB_FILE).write_text(
                         json.dumps(vocab.to_json()))),
                     LossCurve(title=f"captioning ({config.variant} model), run {out.name}",
                               eval_metric="dev_bleu4"),
                     *callbacks])
    if fitted.already_finished:
        log.info("%s already finished %d epoch(s); reporting its test scores", out, train_config.epochs)
    run = load_run(out)  # the best checkpoint (by dev BLEU-4), not the last params
    test = splits["test"]
    report = {"images": len(test.ids), "vocab_size": len(vocab), "max_len": int(max_len)}
    greedy = run.caption(test.features)
    report["greedy"] = score(greedy, test)
    if config.beam > 1:
        report[f"beam{config.beam}"] = score(run.caption(test.features, beam=config.beam), test)
    (out / "metrics.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (out / "test_captions.txt").write_text("".join(f"{i}\t{h}\n" for i, h in zip(test.ids, greedy)))
    return CaptionResult(report, list(zip(test.ids, greedy)), out, fitted.already_finished)


# --- new images -------------------------------------------------------------------------------------------------

def _open_image(path):
    """The image at ``path`` (fully read), or a ValueError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:  # PIL raises SyntaxError on some bad headers
        raise ValueError(f"image {str(path)!r} cannot be read as an image ({type(error).__name__}: {error}); "
                         "expected a PNG or JPEG file") from None
    return image


def image_features(paths, run_config: dict, weights=None) -> np.ndarray:
    """Features ``[N, ...]`` of image files, made the way the run's training features were made."""
    for p in paths:
        if not pathlib.Path(p).is_file():
            raise FileNotFoundError(f"image {str(p)!r} does not exist")
    source = run_config["data"]
    if source["kind"] == "synthetic":
        from jaxseq.data import synthetic_captions as sc

        return np.stack([sc.features(_open_image(p)) for p in paths])
    _, meta = load_npz_features(source["features"])
    encoder = meta.get("encoder")
    if encoder is None:
        raise ValueError(f"{source['features']} does not record its encoder; cannot encode new images the same "
                         "way (re-make it with 'jaxseq caption features')")
    import os
    import tempfile

    from jaxseq.data.flickr8k import image_id
    from jaxseq.encoders.features import extract_to_npz

    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp, "images")
        folder.mkdir()
        names = []
        for i, p in enumerate(paths):
            name = f"{i:05d}{pathlib.Path(p).suffix.lower() or '.jpg'}"
            os.symlink(pathlib.Path(p).resolve(), folder / name)
            names.append(name)
        extract_to_npz(str(folder), encoder, weights, str(pathlib.Path(tmp, "f.npz")),
                       output="grid" if len(run_config["feature_shape"]) > 1 else "pooled", progress=False)
        table, _ = load_npz_features(pathlib.Path(tmp, "f.npz"))
    missing = [p for p, n in zip(paths, names) if image_id(n) not in table]
    if missing:
        raise ValueError(f"could not read image(s): {', '.join(map(str, missing))}")
    return np.stack([table[image_id(n)] for n in names])


def predict(run: CaptionRun, images, *, beam: int = 1, length_penalty: float = 0.6, weights=None) -> list[str]:
    """A caption for each image file in ``images`` (``weights``: the image encoder's, for Flickr8k runs made with
    InceptionV3)."""
    return run.caption(image_features(images, run.run_config, weights), beam=beam, length_penalty=length_penalty)
