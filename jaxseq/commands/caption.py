"""``jaxseq caption {train,eval,predict,features}``: image captioning (merge model, greedy and beam search).

The workflow is ``jaxseq.tasks.caption``; this module maps flags onto it.

Examples::

    jaxseq caption train --epochs 12 --out runs/caption-synthetic          # embedded synthetic set, no download
    jaxseq caption predict --run runs/caption-synthetic picture.png --beam 3
    jaxseq caption features --images Flickr8k/Flicker8k_Dataset --encoder efficientnet_lite0 --out feats.npz
    jaxseq caption train --data Flickr8k --features feats.npz --glove glove.6B.200d.txt --epochs 10 \\
        --out runs/f8k
    jaxseq caption eval --run runs/f8k --beam 3

``train`` cleans the captions (lower case, no punctuation, no one-letter or non-alphabetic words), builds the
vocabulary from the training captions (``--min-count``, 10 for Flickr8k), trains by teacher forcing with
``jaxseq.training.fit`` (best checkpoint by dev BLEU-4), then captions the test images and writes
``metrics.json`` (BLEU-1..4 with all references, greedy and beam; CIDEr/ROUGE-L with the ``caption-metrics``
extra) and ``test_captions.txt``.
"""
from __future__ import annotations

import json
import pathlib

from jaxseq.commands import finite_float, positive_int, reword
from jaxseq.tasks import caption


def register(subparsers) -> None:
    p = subparsers.add_parser("caption", help="image captioning (Flickr8k or the embedded synthetic set)",
                              description=__doc__)
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    t = sub.add_parser("train", help="train a captioning model and report test BLEU")
    t.add_argument("--data", default="synthetic", help="'synthetic' (embedded, drawn with Pillow) or the "
                   "Flickr8k folder (Flickr8k.token.txt and the split lists, directly or in Flickr8k_text/)")
    t.add_argument("--features", default=None, help="features.npz from 'jaxseq caption features' (Flickr8k)")
    t.add_argument("--glove", default=None, help="GloVe text file: frozen word embeddings (sets --embed-dim)")
    t.add_argument("--epochs", type=positive_int, default=10, help="passes over the training captions")
    t.add_argument("--out", required=True, help="run folder (re-running it resumes)")
    t.add_argument("--variant", default="merge", choices=["merge", "inject", "attention"],
                   help="merge: the image joins after the LSTM; inject: the image is the LSTM's initial state; "
                   "attention: each step attends over a feature grid (features made with --grid)")
    t.add_argument("--embed-dim", type=positive_int, default=200, help="word embedding size")
    t.add_argument("--hidden", type=positive_int, default=256, help="LSTM units")
    t.add_argument("--dropout", type=finite_float, default=0.5,
                   help="dropout rate on the image features and word embeddings")
    t.add_argument("--min-count", type=positive_int, default=None,
                   help="vocabulary: words seen fewer times are dropped (default 10 for Flickr8k, 1 for synthetic)")
    t.add_argument("--batch-size", type=positive_int, default=64, help="captions per step")
    t.add_argument("--lr", type=finite_float, default=1e-3, help="Adam learning rate")
    t.add_argument("--seed", type=int, default=0, help="seed of the initial weights, data order and dropout")
    t.add_argument("--synthetic-images", type=positive_int, default=caption.SYNTHETIC_SIZES["train"],
                   help="synthetic training images (dev and test keep their sizes unless this is smaller)")
    t.add_argument("--beam", type=positive_int, default=3, help="beam width for the final test report (besides greedy)")
    t.add_argument("--restart", action="store_true", help="discard an existing run in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(run=run_train)

    e = sub.add_parser("eval", help="BLEU of a trained run on its test (or dev) images")
    e.add_argument("--run", dest="run_dir", required=True, help="a caption train run folder")
    e.add_argument("--split", default="test", choices=["dev", "test"], help="which images to caption")
    e.add_argument("--beam", type=positive_int, default=1, help="beam width (1 = greedy)")
    e.add_argument("--length-penalty", type=finite_float, default=0.6,
                   help="beam search: log-probability / ((5 + length) / 6) ** this (0: raw sums)")
    e.set_defaults(run=run_eval)

    r = sub.add_parser("predict", help="print a caption for each image")
    r.add_argument("--run", dest="run_dir", required=True, help="a caption train run folder")
    r.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    r.add_argument("--beam", type=positive_int, default=1, help="beam width (1 = greedy)")
    r.add_argument("--length-penalty", type=finite_float, default=0.6,
                   help="beam search: log-probability / ((5 + length) / 6) ** this (0: raw sums)")
    r.add_argument("--weights", default=None, help="image encoder weights (Flickr8k runs made with InceptionV3)")
    r.set_defaults(run=run_predict)

    f = sub.add_parser("features", help="encode a folder of images into features.npz (pretrained CNN)")
    f.add_argument("--images", required=True, help="folder of images")
    f.add_argument("--encoder", required=True, choices=["efficientnet_lite0", "inception_v3"],
                   help="pretrained ImageNet CNN: EfficientNet-Lite0 (weights from the pretrained extra) or "
                   "InceptionV3 (Keras .h5 weights you give with --weights)")
    f.add_argument("--weights", default=None, help="weights file (InceptionV3: the Keras .h5 you downloaded)")
    f.add_argument("--out", required=True, help="output .npz")
    f.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    f.add_argument("--grid", action="store_true",
                   help="keep the last feature map [h, w, D] (for --variant attention) instead of pooling")
    f.set_defaults(run=run_features)


def _train_config(args):
    from jaxseq.training import TrainConfig

    return TrainConfig(out_dir=args.out, seed=args.seed, epochs=args.epochs, batch_size=args.batch_size,
                       learning_rate=args.lr, restart=args.restart, progress=not args.no_progress)


def run_train(args) -> int:
    config = caption.CaptionTaskConfig(data=args.data, features=args.features, glove=args.glove,
                                       variant=args.variant, embed_dim=args.embed_dim, hidden=args.hidden,
                                       dropout=args.dropout, min_count=args.min_count,
                                       synthetic_images=args.synthetic_images, beam=args.beam)
    try:
        result = caption.train_and_evaluate(config, _train_config(args))
    except (ValueError, FileNotFoundError) as error:
        raise reword(error) from None
    print(json.dumps(result.metrics, indent=2, sort_keys=True))
    return 0


def run_eval(args) -> int:
    result = caption.evaluate(caption.load_run(args.run_dir), args.split, beam=args.beam,
                              length_penalty=args.length_penalty)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def run_predict(args) -> int:
    run = caption.load_run(args.run_dir)
    texts = caption.predict(run, args.images, beam=args.beam, length_penalty=args.length_penalty,
                            weights=args.weights)
    for path, text in zip(args.images, texts):
        print(f"{path}\t{text}")
    return 0


def run_features(args) -> int:
    from jaxseq.encoders.features import extract_to_npz

    if not pathlib.Path(args.images).is_dir():
        raise FileNotFoundError(f"--images {args.images!r} is not a folder")
    return int(extract_to_npz(args.images, args.encoder, args.weights, args.out, batch_size=args.batch_size,
                              output="grid" if args.grid else "pooled"))
