"""``jaxseq caption {train,eval,predict,features}``: chapter 18's image captioning.

Examples::

    jaxseq caption train --epochs 15 --out runs/caption-synthetic          # embedded synthetic set, no download
    jaxseq caption features --images Flickr8k/Flicker8k_Dataset --encoder efficientnet_lite0 --out feats.npz
    jaxseq caption train --data Flickr8k --features feats.npz --glove glove.6B.200d.txt --epochs 10 \\
        --out runs/caption-flickr8k
    jaxseq caption eval --run runs/caption-flickr8k --beam 3
    jaxseq caption predict --run runs/caption-synthetic image.png --beam 3

``train`` cleans the captions as the chapter does, builds the vocabulary from the training captions
(``--min-count``, 10 for Flickr8k as in the chapter), trains by teacher forcing with ``jaxseq.training.fit``
(best checkpoint by dev BLEU-4), then captions the test images and writes ``metrics.json`` (BLEU-1..4 with all
references, greedy and beam; CIDEr/ROUGE-L with the ``caption-metrics`` extra) and ``test_captions.txt``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

from jaxseq.commands import finite_float, positive_int, reword

VOCAB_FILE = "vocab.json"
SYNTHETIC_SIZES = {"train": 2000, "dev": 200, "test": 300}


def register(subparsers) -> None:
    p = subparsers.add_parser("caption", help="image captioning (Flickr8k or the embedded synthetic set)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    t = sub.add_parser("train", help="train a captioning model and report test BLEU")
    t.add_argument("--data", default="synthetic", help="'synthetic' (embedded, drawn with Pillow) or the "
                   "Flickr8k folder (Flickr8k.token.txt and the split lists, directly or in Flickr8k_text/)")
    t.add_argument("--features", default=None, help="features.npz from 'jaxseq caption features' (Flickr8k)")
    t.add_argument("--glove", default=None, help="GloVe text file: frozen word embeddings (sets --embed-dim)")
    t.add_argument("--epochs", type=positive_int, default=10)
    t.add_argument("--out", required=True, help="run folder (re-running it resumes)")
    t.add_argument("--variant", default="merge", choices=["merge", "inject", "attention"])
    t.add_argument("--embed-dim", type=positive_int, default=200)
    t.add_argument("--hidden", type=positive_int, default=256)
    t.add_argument("--dropout", type=finite_float, default=0.5)
    t.add_argument("--min-count", type=positive_int, default=None,
                   help="vocabulary threshold (default 10 for Flickr8k as in the chapter, 1 for synthetic)")
    t.add_argument("--batch-size", type=positive_int, default=64, help="captions per step")
    t.add_argument("--lr", type=finite_float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--synthetic-images", type=positive_int, default=SYNTHETIC_SIZES["train"],
                   help="synthetic training images (dev and test keep their sizes unless this is smaller)")
    t.add_argument("--beam", type=positive_int, default=3, help="beam width for the final test report (besides greedy)")
    t.add_argument("--restart", action="store_true", help="discard an existing run in --out")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(run=run_train)

    e = sub.add_parser("eval", help="BLEU of a trained run on its test (or dev) images")
    e.add_argument("--run", dest="run_dir", required=True, help="a caption train run folder")
    e.add_argument("--split", default="test", choices=["dev", "test"])
    e.add_argument("--beam", type=positive_int, default=1, help="beam width (1 = greedy)")
    e.add_argument("--length-penalty", type=finite_float, default=0.6)
    e.set_defaults(run=run_eval)

    r = sub.add_parser("predict", help="print a caption for each image")
    r.add_argument("--run", dest="run_dir", required=True, help="a caption train run folder")
    r.add_argument("images", nargs="+", metavar="IMAGE")
    r.add_argument("--beam", type=positive_int, default=1, help="beam width (1 = greedy)")
    r.add_argument("--length-penalty", type=finite_float, default=0.6)
    r.add_argument("--weights", default=None, help="image encoder weights (Flickr8k runs made with InceptionV3)")
    r.set_defaults(run=run_predict)

    f = sub.add_parser("features", help="encode a folder of images into features.npz (pretrained CNN)")
    f.add_argument("--images", required=True, help="folder of images")
    f.add_argument("--encoder", required=True, choices=["efficientnet_lite0", "inception_v3"])
    f.add_argument("--weights", default=None, help="weights file (InceptionV3: the Keras .h5 you downloaded)")
    f.add_argument("--out", required=True, help="output .npz")
    f.add_argument("--batch-size", type=positive_int, default=32)
    f.add_argument("--grid", action="store_true",
                   help="keep the last feature map [h, w, D] (for --variant attention) instead of pooling")
    f.set_defaults(run=run_features)


# --- data -------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Split:
    """Images of one split: ``ids``, ``features`` ``[N, ...]`` and raw reference ``captions`` (lists)."""

    ids: list
    features: object
    captions: list
    scenes: list | None = None  # synthetic only: the drawn attributes, for attribute accuracy


def load_npz_features(path) -> tuple[dict, dict]:
    """``({image_id: features}, metadata)`` from a ``caption features`` file (``ids`` + ``features``)."""
    import zipfile

    import numpy as np

    from jaxseq.data.flickr8k import image_id

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--features {str(path)!r} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
        if not hasattr(data, "files"):  # a bare .npy array, not an archive
            raise ValueError("it holds a single array, not an .npz archive")
        with data:
            if "ids" not in data or "features" not in data:
                raise ValueError(f"--features {str(path)!r} must hold arrays 'ids' and 'features', has "
                                 f"{data.files}")
            ids, feats = [str(i) for i in data["ids"]], np.asarray(data["features"], np.float32)
            meta = {k: data[k].item() if data[k].ndim == 0 else None for k in data.files
                    if k not in ("ids", "features")}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        if str(error).startswith("--features"):
            raise
        raise ValueError(f"--features {str(path)!r} is not a readable .npz made by 'jaxseq caption features' "
                         f"({error})") from None
    if len(ids) != len(feats):
        raise ValueError(f"--features {str(path)!r}: {len(ids)} ids but {len(feats)} feature rows")
    bad = [i for i, row in zip(ids, feats) if not np.isfinite(row).all()]
    if bad:
        raise ValueError(f"--features {str(path)!r}: non-finite (NaN or inf) features for {len(bad)} image(s): "
                         f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}; re-make them with 'jaxseq "
                         "caption features'")
    return {image_id(i): f for i, f in zip(ids, feats)}, {k: v for k, v in meta.items() if v is not None}


def load_splits(source: dict, *, warn=print) -> dict[str, Split]:
    """The three splits described by ``source`` (the run config's ``data`` entry)."""
    import numpy as np

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
        warn(f"flickr8k: {line}")
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
            raise ValueError(f"--variant attention needs grid features [N, h, w, D], got {features.shape}; make "
                             "them with 'jaxseq caption features --grid'")
        from jaxseq.data import synthetic_captions as sc

        return sc.grid_features(features)
    return features


# --- the run ----------------------------------------------------------------------------------------------------

class Captioner:
    """A trained run: model, params and vocabulary; features in, captions out."""

    def __init__(self, run_dir):
        from jaxseq.data.text import Vocab
        from jaxseq.models import captioning as cap
        from jaxseq.training import load_run_config, restore_params

        run_dir = pathlib.Path(run_dir)
        if not (run_dir / VOCAB_FILE).is_file():
            raise FileNotFoundError(f"--run {str(run_dir)!r} is not a caption train run folder (no {VOCAB_FILE})")
        self.run_config = load_run_config(str(run_dir))
        self.vocab = Vocab.from_json(json.loads((run_dir / VOCAB_FILE).read_text()))
        self.model = cap.CaptionModel(cap.CaptionConfig(**self.run_config["model"]))
        shape = tuple(self.run_config["feature_shape"])
        self.params = restore_params(str(run_dir), lambda k: cap.init_params(self.model, k, shape))
        self.max_len = self.run_config["max_len"]

    def caption(self, features, *, beam: int = 1, length_penalty: float = 0.6, batch_size: int = 256):
        """Captions (strings) for ``features`` ``[N, ...]``, decoded in batches."""
        import numpy as np

        from jaxseq.models import captioning as cap

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
            out.extend(self.vocab.decode(row) for row in tokens)
        return out


def score(hypotheses, split: Split) -> dict:
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


def run_train(args) -> int:
    import numpy as np

    from jaxseq.data import glove as glove_lib
    from jaxseq.data.text import END, START, Vocab, clean_caption, wrap
    from jaxseq.models import captioning as cap
    from jaxseq.training import TrainConfig, fit

    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if args.data == "synthetic":
        if args.features:
            raise ValueError("--features is for Flickr8k; the synthetic set computes its own pixel features")
        n = args.synthetic_images
        if n < 1:
            raise ValueError(f"--synthetic-images must be >= 1, got {n}")
        source = {"kind": "synthetic", "seed": args.seed,
                  "sizes": {split: min(size, n) if split != "train" else n
                            for split, size in SYNTHETIC_SIZES.items()}}
        min_count = 1 if args.min_count is None else args.min_count
    else:
        root = pathlib.Path(args.data)
        if not root.is_dir():
            raise FileNotFoundError(f"--data {args.data!r} is neither 'synthetic' nor a folder")
        if not args.features:
            raise ValueError("--data DIR needs --features FILE.npz; make it with 'jaxseq caption features "
                             "--images DIR/Flicker8k_Dataset --encoder efficientnet_lite0 --out FILE.npz'")
        source = {"kind": "flickr8k", "root": str(root.resolve()),
                  "features": str(pathlib.Path(args.features).resolve())}
        min_count = 10 if args.min_count is None else args.min_count
    splits = load_splits(source, warn=lambda m: print(m, file=sys.stderr))
    train = splits["train"]
    texts = [[wrap(clean_caption(c)) for c in caps] for caps in train.captions]
    vocab = Vocab.build((t for caps in texts for t in caps), min_count=min_count)
    image_index = np.repeat(np.arange(len(texts)), [len(caps) for caps in texts])
    if any(w not in vocab for w in (START, END)) or len(vocab) <= 3:
        captions = sum(len(caps) for caps in texts)
        raise ValueError(f"--min-count {min_count} leaves no caption word in the vocabulary: no word occurs "
                         f"{min_count} times in the {captions} training captions, so every caption became "
                         "empty; lower --min-count")
    tokens = vocab.encode_batch([t for caps in texts for t in caps])
    if args.batch_size > len(tokens):
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(tokens)} training captions; "
                         f"use at most {len(tokens)}")
    max_len = tokens.shape[1] - 1  # words after startseq, endseq included (34 on Flickr8k, as the chapter)

    embedding = None
    embed_dim = args.embed_dim
    if args.glove:
        embedding, found = glove_lib.embedding_matrix(args.glove, vocab)
        embed_dim = embedding.shape[1]
        print(f"GloVe: {found} of {len(vocab) - 1} vocabulary words found; the rest are zero rows",
              file=sys.stderr)
    config = cap.CaptionConfig(vocab_size=len(vocab), embed_dim=embed_dim, hidden=args.hidden,
                               variant=args.variant, dropout=args.dropout, freeze_embedding=embedding is not None)
    model = cap.CaptionModel(config)
    train_features = _model_features(np.asarray(train.features, np.float32), args.variant, source["kind"])
    feature_shape = train_features.shape[1:]

    def init(key):
        return cap.init_params(model, key, feature_shape, embedding_matrix=embedding)

    def loss_fn(params, batch, key):
        return cap.caption_loss(model, params, batch, key)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / VOCAB_FILE).write_text(json.dumps(vocab.to_json()))
    dev = splits["dev"]
    dev_features = _model_features(np.asarray(dev.features, np.float32), args.variant, source["kind"])
    dev_refs = [[clean_caption(c) for c in caps] for caps in dev.captions]

    def evaluate(params):
        from jaxseq import metrics

        toks, _ = cap.generate(model, params, dev_features, start=vocab.start_index, end=vocab.end_index,
                               max_len=max_len)
        hyps = [vocab.decode(row) for row in np.asarray(toks)]
        bleu = metrics.caption_bleu(hyps, dev_refs)
        return {"dev_bleu4": bleu["bleu4"], "dev_bleu1": bleu["bleu1"]}

    run_config = {"task": "caption", "data": source, "model": dataclasses.asdict(config),
                  "feature_shape": list(feature_shape), "max_len": int(max_len), "min_count": min_count,
                  "glove": str(pathlib.Path(args.glove).resolve()) if args.glove else None}
    train_config = TrainConfig(out_dir=str(out), seed=args.seed, epochs=args.epochs, batch_size=args.batch_size,
                               learning_rate=args.lr, best_metric="dev_bleu4", best_mode="max",
                               restart=args.restart, progress=not args.no_progress)
    batches = cap.CaptionBatches(train_features, image_index, tokens, args.batch_size, seed=args.seed)
    try:
        result = fit(train_config, init_params=init, loss_fn=loss_fn, train=batches, evaluate=evaluate,
                     run_config=run_config)
    except ValueError as error:
        raise reword(error) from None
    if result.already_finished:
        print(f"{out} already finished {args.epochs} epoch(s); reporting its test scores", file=sys.stderr)
    captioner = Captioner(out)  # the best checkpoint (by dev BLEU-4), not the last params
    test = splits["test"]
    report = {"images": len(test.ids), "vocab_size": len(vocab), "max_len": int(max_len)}
    greedy = captioner.caption(test.features)
    report["greedy"] = score(greedy, test)
    if args.beam > 1:
        report[f"beam{args.beam}"] = score(captioner.caption(test.features, beam=args.beam), test)
    (out / "metrics.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (out / "test_captions.txt").write_text("".join(f"{i}\t{h}\n" for i, h in zip(test.ids, greedy)))
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


def run_eval(args) -> int:
    if args.beam < 1:
        raise ValueError(f"--beam must be >= 1, got {args.beam}")
    captioner = Captioner(args.run_dir)
    split = load_splits(captioner.run_config["data"], warn=lambda m: print(m, file=sys.stderr))[args.split]
    hyps = captioner.caption(split.features, beam=args.beam, length_penalty=args.length_penalty)
    result = {"split": args.split, "images": len(hyps), "beam": args.beam, **score(hyps, split)}
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


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


def _image_features(paths, run_config, weights=None) -> "object":
    """Features of image files the way the run's training features were made."""
    import numpy as np
    from PIL import Image

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

    from jaxseq.encoders.features import extract_to_npz

    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp, "images")
        folder.mkdir()
        names = []
        for i, p in enumerate(paths):
            name = f"{i:05d}{pathlib.Path(p).suffix.lower() or '.jpg'}"
            os.symlink(pathlib.Path(p).resolve(), folder / name)
            names.append(name)
        code = extract_to_npz(str(folder), encoder, weights, str(pathlib.Path(tmp, "f.npz")),
                              output="grid" if len(run_config["feature_shape"]) > 1 else "pooled", progress=False)
        if code != 0:
            raise ValueError(f"encoding the images with {encoder} failed (exit code {code})")
        table, _ = load_npz_features(pathlib.Path(tmp, "f.npz"))
    from jaxseq.data.flickr8k import image_id

    missing = [p for p, n in zip(paths, names) if image_id(n) not in table]
    if missing:
        raise ValueError(f"could not read image(s): {', '.join(map(str, missing))}")
    return np.stack([table[image_id(n)] for n in names])


def run_predict(args) -> int:
    for p in args.images:
        if not pathlib.Path(p).is_file():
            raise FileNotFoundError(f"image {p!r} does not exist")
    if args.beam < 1:
        raise ValueError(f"--beam must be >= 1, got {args.beam}")
    captioner = Captioner(args.run_dir)
    features = _image_features(args.images, captioner.run_config, args.weights)
    for path, text in zip(args.images, captioner.caption(features, beam=args.beam,
                                                         length_penalty=args.length_penalty)):
        print(f"{path}\t{text}")
    return 0


def run_features(args) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not pathlib.Path(args.images).is_dir():
        raise FileNotFoundError(f"--images {args.images!r} is not a folder")
    from jaxseq.encoders.features import extract_to_npz

    return int(extract_to_npz(args.images, args.encoder, args.weights, args.out, batch_size=args.batch_size,
                              output="grid" if args.grid else "pooled"))
