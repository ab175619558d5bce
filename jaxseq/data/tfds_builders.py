"""TensorFlow Datasets builders for Flickr8k and IWSLT'15 en-vi, built and read without TensorFlow.

Optional (``pip install 'jaxseq[tfds]'``: tensorflow-datasets, array_record, importlib_resources). Neither
dataset is in the TFDS catalog and neither can be downloaded by code (Flickr8k is given out on request;
the IWSLT files come from the Stanford NMT page), so both builders read files the user placed in a
``manual_dir`` and nothing is fetched.

Without TensorFlow only some of TFDS works, hence the choices here:

- files are written as ``array_record`` (the default ``tfrecord`` writer needs TensorFlow);
- data is read by random access, ``tfds.data_source(name, data_dir=..., split=...)`` (``tfds.load`` and
  ``as_dataset`` need TensorFlow); it returns a sequence of dicts of numpy values;
- images are stored from their files' bytes (encoding a numpy array would need TensorFlow) and decoded
  with Pillow on read.

Usage::

    from jaxseq.data import tfds_builders
    tfds_builders.prepare("flickr8k", manual_dir="~/data/flickr8k", data_dir="~/tensorflow_datasets")
    import tensorflow_datasets as tfds
    # download=False: read what prepare() wrote; never let TFDS look for the name anywhere else.
    train = tfds.data_source("flickr8k", data_dir="~/tensorflow_datasets", split="train", download=False)
    train[0]["captions"]  # array of 5 byte strings; train[0]["image"] is uint8 [height, width, 3]

Once prepared, ``tfds.builder_from_directory(data_dir/flickr8k/1.0.0).as_data_source()`` reads the data in a
process that never imports this module.
"""
from __future__ import annotations

import os
import pathlib

try:
    import tensorflow_datasets as tfds
except ImportError as error:  # the extra is optional; say how to get it
    raise ImportError("jaxseq.data.tfds_builders needs tensorflow-datasets: "
                      "pip install 'jaxseq[tfds]' (tensorflow-datasets, array_record, importlib_resources)") from error

from jaxseq.data import flickr8k as flickr8k_data
from jaxseq.data import translation

FILE_FORMAT = "array_record"


class Flickr8k(tfds.core.GeneratorBasedBuilder):
    """Flickr8k images with their five captions each, in the standard 6,000 / 1,000 / 1,000 splits."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images, image ids and raw captions from the manual folder."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Put the Flickr8k files (given out by the University of Illinois on request) in the manual folder:
      Flickr8k.token.txt, Flickr_8k.trainImages.txt, Flickr_8k.devImages.txt, Flickr_8k.testImages.txt
      (directly, or in a Flickr8k_text/ subfolder), and the JPEGs in Flicker8k_Dataset/ (the archive's
      spelling), Flickr8k_Dataset/ or images/.
    Split ids without captions and captions whose image is missing are left out, and are counted in the
    log, not fatal (the loader is jaxseq.data.flickr8k.load)."""

    def _info(self) -> tfds.core.DatasetInfo:
        # tfds.core.DatasetInfo directly: dataset_info_from_configs() looks for metadata files next to
        # the builder's package, which a module like this one does not have.
        return tfds.core.DatasetInfo(
            builder=self,
            description="Flickr8k: 8,000 Flickr photos with five crowd-sourced captions each.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "image_id": tfds.features.Text(),
                "captions": tfds.features.Sequence(tfds.features.Text()),
            }),
            homepage="https://hockenmaier.cs.illinois.edu/8k-pictures.html",
            citation="""@article{hodosh2013framing,
  title={Framing Image Description as a Ranking Task: Data, Models and Evaluation Metrics},
  author={Hodosh, Micah and Young, Peter and Hockenmaier, Julia},
  journal={Journal of Artificial Intelligence Research}, volume={47}, pages={853--899}, year={2013}}""",
        )

    def _split_generators(self, dl_manager):
        root = pathlib.Path(dl_manager.manual_dir)
        data = flickr8k_data.load(root)
        if data.images_dir is None:
            raise FileNotFoundError(f"{root}: no image folder (Flicker8k_Dataset/, Flickr8k_Dataset/ or images/)")
        for line in data.report.lines():
            print(f"flickr8k: {line}")
        files = {flickr8k_data.image_id(p.name): p for p in sorted(data.images_dir.iterdir()) if p.is_file()}
        names = {"train": "train", "dev": "validation", "test": "test"}
        generators = {}
        for split, captions in data.splits.items():
            if captions:
                generators[names[split]] = self._generate_examples(captions, files)
            else:  # TFDS cannot write an empty split; say so rather than fail the whole build
                print(f"flickr8k: split {names[split]!r} has no image with captions; left out")
        if not generators:
            raise FileNotFoundError(f"{root}: no split has an image with captions")
        return generators

    def _generate_examples(self, captions: dict, files: dict):
        for image_id in sorted(captions):
            yield image_id, {"image": os.fspath(files[image_id]), "image_id": image_id,
                             "captions": captions[image_id]}


class Iwslt15EnVi(tfds.core.GeneratorBasedBuilder):
    """IWSLT'15 English-Vietnamese (TED talks), Stanford NMT preprocessing: train, tst2012, tst2013."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Sentence pairs, Moses escapes undone, NFC-normalised, empty pairs dropped."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Put the Stanford NMT files (https://nlp.stanford.edu/projects/nmt/) in the manual folder:
      train.en, train.vi (133,317 lines), tst2012.en, tst2012.vi (validation, 1,553 lines) and optionally
      tst2013.en, tst2013.vi (test, 1,268 lines)."""

    SPLIT_FILES = {"train": "train", "validation": "tst2012", "test": "tst2013"}
    REQUIRED_SPLITS = ("train", "validation")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=("IWSLT'15 English-Vietnamese TED talk transcripts as prepared by the Stanford NLP "
                         "group (tokenised). Text is read with jaxseq.data.translation.read_parallel: Moses "
                         "escapes such as &apos; are undone and Unicode is NFC-normalised."),
            features=tfds.features.Translation(languages=("en", "vi")),
            supervised_keys=("en", "vi"),
            homepage="https://nlp.stanford.edu/projects/nmt/",
            citation="""@inproceedings{luong2015stanford,
  title={Stanford Neural Machine Translation Systems for Spoken Language Domains},
  author={Luong, Minh-Thang and Manning, Christopher D.}, booktitle={IWSLT}, year={2015}}""",
        )

    def _split_generators(self, dl_manager):
        root = pathlib.Path(dl_manager.manual_dir)
        generators = {}
        for split, stem in self.SPLIT_FILES.items():
            en, vi = root / f"{stem}.en", root / f"{stem}.vi"
            if en.is_file() and vi.is_file():
                generators[split] = self._generate_examples(en, vi)
            elif split in self.REQUIRED_SPLITS:
                raise FileNotFoundError(f"{root}: the {split} split needs {en.name} and {vi.name}")
        return generators

    def _generate_examples(self, en: pathlib.Path, vi: pathlib.Path):
        stats = translation.ReadStats()
        for pair in translation.read_parallel(en, vi, empty="drop", stats=stats):
            yield pair.line, {"en": pair.source, "vi": pair.target}
        print(f"iwslt15_en_vi {en.stem}: {stats.summary()}")


BUILDERS = {"flickr8k": Flickr8k, "iwslt15_en_vi": Iwslt15EnVi}


def prepare(name: str, *, manual_dir, data_dir) -> tfds.core.DatasetBuilder:
    """Build dataset ``name`` (``"flickr8k"`` or ``"iwslt15_en_vi"``) from ``manual_dir`` into ``data_dir``.

    Nothing is downloaded: GCS lookups are off and the source files come from ``manual_dir``. A dataset
    already prepared in ``data_dir`` is left as it is. Returns the builder (``builder.as_data_source()``).

    Raises:
      ValueError: unknown name. FileNotFoundError: ``manual_dir`` missing or incomplete.
    """
    if name not in BUILDERS:
        raise ValueError(f"name={name!r}, expected one of {sorted(BUILDERS)}")
    manual_dir = pathlib.Path(manual_dir).expanduser()
    if not manual_dir.is_dir():
        raise FileNotFoundError(f"manual_dir {str(manual_dir)!r} does not exist:\n"
                                f"{BUILDERS[name].MANUAL_DOWNLOAD_INSTRUCTIONS}")
    builder = BUILDERS[name](data_dir=os.fspath(pathlib.Path(data_dir).expanduser()), file_format=FILE_FORMAT)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir), try_download_gcs=False))
    return builder
