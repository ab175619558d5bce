"""TFDS builders (Flickr8k, IWSLT'15 en-vi) on tiny folders made here: array_record, manual_dir, data_source.

No TensorFlow and no download: the source files are written into ``tmp_path`` and nothing leaves it.
"""
from __future__ import annotations

import pathlib
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
from helpers import skip_unless_installed

skip_unless_installed("tensorflow_datasets", "array_record")

import tensorflow_datasets as tfds  # noqa: E402

from jaxseq.data import tfds_builders  # noqa: E402

PHOTO_IDS = ("1000_a", "1001_b", "1002_c")  # 1003_d has captions but no image


@pytest.fixture
def flickr_dir(tmp_path) -> pathlib.Path:
    from PIL import Image

    root = tmp_path / "flickr8k_manual"
    (root / "Flicker8k_Dataset").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in PHOTO_IDS:
        pixels = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "Flicker8k_Dataset" / f"{name}.jpg")
    ids = PHOTO_IDS + ("1003_d",)
    (root / "Flickr8k.token.txt").write_text(
        "".join(f"{i}.jpg#{k}\tCaption {k} of {i} .\n" for i in ids for k in range(5)))
    (root / "Flickr_8k.trainImages.txt").write_text("1000_a.jpg\n1001_b.jpg\n")
    (root / "Flickr_8k.devImages.txt").write_text("1002_c.jpg\n1003_d.jpg\n")
    (root / "Flickr_8k.testImages.txt").write_text("1003_d.jpg\n")
    return root


VI_DECOMPOSED = unicodedata.normalize("NFD", "Tôi không biết .")


@pytest.fixture
def iwslt_dir(tmp_path) -> pathlib.Path:
    root = tmp_path / "iwslt_manual"
    root.mkdir()
    # A BOM, CRLF line ends, Moses escapes, decomposed diacritics and one empty line (dropped with its partner).
    (root / "train.en").write_bytes("\ufeffI don &apos;t know .\r\n\r\nHello , world\r\n".encode())
    (root / "train.vi").write_bytes(f"{VI_DECOMPOSED}\r\nxin\r\nXin chào\r\n".encode())
    (root / "tst2012.en").write_text("Thank you .\n", encoding="utf-8")
    (root / "tst2012.vi").write_text("Cảm ơn .\n", encoding="utf-8")
    return root


def _rows(source) -> list[dict]:
    return [source[i] for i in range(len(source))]


def test_flickr8k_builder(flickr_dir, tmp_path):
    from PIL import Image

    data_dir = tmp_path / "tfds"
    builder = tfds_builders.prepare("flickr8k", manual_dir=flickr_dir, data_dir=data_dir)
    assert builder.info.file_format.value == "array_record"
    # 1003_d has no image: validation keeps only 1002_c, and the test split (only 1003_d) is left out.
    assert {name: split.num_examples for name, split in builder.info.splits.items()} == {"train": 2, "validation": 1}
    written = [p.name for p in (data_dir / "flickr8k" / "1.0.0").iterdir()]
    assert any("array_record" in name for name in written) and not any("tfrecord" in name for name in written)

    train = tfds.data_source("flickr8k", data_dir=data_dir, split="train", download=False)
    rows = {row["image_id"].decode(): row for row in _rows(train)}
    assert sorted(rows) == ["1000_a", "1001_b"]
    row = rows["1001_b"]
    assert [c.decode() for c in row["captions"]] == [f"Caption {k} of 1001_b ." for k in range(5)]
    # Stored as the file's own JPEG bytes, so decoding gives exactly what Pillow reads from the file.
    expected = np.asarray(Image.open(flickr_dir / "Flicker8k_Dataset" / "1001_b.jpg").convert("RGB"))
    np.testing.assert_array_equal(row["image"], expected)


def test_iwslt15_builder(iwslt_dir, tmp_path):
    data_dir = tmp_path / "tfds"
    builder = tfds_builders.prepare("iwslt15_en_vi", manual_dir=iwslt_dir, data_dir=data_dir)
    assert builder.info.supervised_keys == ("en", "vi")
    sources = tfds.data_source("iwslt15_en_vi", data_dir=data_dir, download=False)
    assert sorted(sources) == ["train", "validation"]  # no tst2013 files: no test split
    train = sorted((r["en"].decode(), r["vi"].decode()) for r in _rows(sources["train"]))
    assert train == [("Hello , world", "Xin chào"), ("I don 't know .", "Tôi không biết .")]
    assert unicodedata.is_normalized("NFC", train[1][1])
    validation = [(r["en"].decode(), r["vi"].decode()) for r in _rows(sources["validation"])]
    assert validation == [("Thank you .", "Cảm ơn .")]


def test_prepared_data_reads_in_a_fresh_process_without_jaxseq(iwslt_dir, tmp_path):
    data_dir = tmp_path / "tfds"
    tfds_builders.prepare("iwslt15_en_vi", manual_dir=iwslt_dir, data_dir=data_dir)
    script = ("import sys, tensorflow_datasets as tfds\n"
              "source = tfds.builder_from_directory(sys.argv[1]).as_data_source(split='validation')\n"
              "print(len(source), source[0]['vi'].decode())\n"
              "assert 'jaxseq' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", script, str(data_dir / "iwslt15_en_vi" / "1.0.0")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "1 Cảm ơn ."


def test_missing_or_incomplete_manual_dir(tmp_path, iwslt_dir):
    with pytest.raises(FileNotFoundError, match="Flickr8k.token.txt"):
        tfds_builders.prepare("flickr8k", manual_dir=tmp_path / "absent", data_dir=tmp_path / "tfds")
    (iwslt_dir / "tst2012.vi").unlink()
    with pytest.raises(FileNotFoundError, match="validation split needs tst2012.en and tst2012.vi"):
        tfds_builders.prepare("iwslt15_en_vi", manual_dir=iwslt_dir, data_dir=tmp_path / "tfds")
    with pytest.raises(ValueError, match="expected one of"):
        tfds_builders.prepare("coco_captions", manual_dir=iwslt_dir, data_dir=tmp_path / "tfds")
