"""Flickr8k: the caption token file, the split lists and (optionally) the image folder.

File formats (Hodosh et al. 2013):

* ``Flickr8k.token.txt``: one caption a line, ``<image>.jpg#<0-4><TAB><caption>``; 8,092 images x 5.
* ``Flickr_8k.{train,dev,test}Images.txt``: one image file name a line (6,000 / 1,000 / 1,000).

Image ids are file names without the extension, as in the chapter (``1000268201_693b08cb0e``). The file has
one odd id, ``2258277193_586949ec62.jpg.1``, whose image is ``2258277193_586949ec62.jpg``; it maps to the same
stem (as the chapter's ``split('.')[0]`` does) and is listed in ``Report.odd_ids``.

Malformed lines never crash the loaders: they are skipped and reported with their line numbers
(``warnings.warn``, or ``ValueError`` with ``strict=True``); split ids without captions and captions whose
image is missing are listed in the ``Report``. A file with nothing usable in it (empty, or every line
malformed) raises a ``ValueError`` naming it.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import warnings

TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}
# Folder names used by the original archives and by the shared copy.
_TEXT_DIRS = ("", "Flickr8k_text")
_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "images")

_NAME = re.compile(r"^[^\s#/\\]+\.(jpg|jpeg|png)(\.\d+)?$", re.IGNORECASE)


def image_id(name: str) -> str:
    """``1000268201_693b08cb0e.jpg`` (or ``...jpg#3``, ``...jpg.1``) -> ``1000268201_693b08cb0e``."""
    return os.path.basename(name.split("#", 1)[0]).split(".", 1)[0]


@dataclasses.dataclass
class Report:
    """What did not fit, listed instead of crashing.

    Attributes:
      malformed: ``(file, line_number, line, reason)`` for skipped lines (line numbers start at 1).
      odd_ids: raw names that are not ``<stem>.jpg`` but were understood (``2258277193_586949ec62.jpg.1``).
      split_without_captions: ``{split: [image ids in the split list with no caption]}``.
      missing_images: image ids that have captions but no image file (or no feature vector).
    """

    malformed: list = dataclasses.field(default_factory=list)
    odd_ids: list = dataclasses.field(default_factory=list)
    split_without_captions: dict = dataclasses.field(default_factory=dict)
    missing_images: list = dataclasses.field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable summary, one problem kind a line (empty when all is well)."""
        out = []
        if self.malformed:
            where = ", ".join(f"{os.path.basename(f)}:{n} ({why})" for f, n, _, why in self.malformed[:10])
            more = f" and {len(self.malformed) - 10} more" if len(self.malformed) > 10 else ""
            out.append(f"{len(self.malformed)} malformed line(s) skipped: {where}{more}")
        if self.odd_ids:
            out.append(f"{len(self.odd_ids)} odd image name(s) mapped to their stem: {', '.join(self.odd_ids)}")
        for split, ids in self.split_without_captions.items():
            if ids:
                out.append(f"{len(ids)} {split} image(s) without captions: {', '.join(sorted(ids)[:10])}")
        if self.missing_images:
            ids = sorted(self.missing_images)
            out.append(f"{len(ids)} captioned image(s) without image/features: {', '.join(ids[:10])}"
                       + (" ..." if len(ids) > 10 else ""))
        return out


def _complain(problems: list, strict: bool, warn: bool) -> None:
    if not problems or not (strict or warn):
        return
    message = "; ".join(f"{os.path.basename(f)} line {n}: {why}: {line!r}" for f, n, line, why in problems[:20])
    if len(problems) > 20:
        message += f"; and {len(problems) - 20} more"
    if strict:
        raise ValueError(f"{len(problems)} malformed line(s): {message}")
    warnings.warn(f"skipped {len(problems)} malformed line(s): {message}", stacklevel=3)


def load_captions(token_file, *, strict: bool = False, report: Report | None = None,
                  warn: bool = True) -> dict[str, list[str]]:
    """Read the token file into ``{image_id: [caption, ...]}`` (raw captions, file order).

    Args:
      token_file: path of ``Flickr8k.token.txt``.
      strict: raise ``ValueError`` on malformed lines instead of skipping them with a warning.
      report: filled with the malformed lines and odd ids, if given.
      warn: warn about skipped lines (``load`` does not: its report lists them, and callers show it once).
    """
    path = pathlib.Path(token_file)
    if not path.is_file():
        raise FileNotFoundError(f"token_file {str(path)!r} does not exist")
    report = Report() if report is None else report
    captions: dict[str, list[str]] = {}
    problems = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            name, _, caption = line.partition("\t")
            if not caption:  # tolerate space-separated copies, as the chapter's split() does
                name, _, caption = line.strip().partition(" ")
            name, caption = name.strip(), caption.strip()
            file_name, hash_, index = name.partition("#")
            if not caption:
                problems.append((str(path), number, line, "no caption after the image name"))
            elif not hash_ or not index.isdigit():
                problems.append((str(path), number, line, "image name lacks the '#<n>' caption number"))
            elif not _NAME.match(file_name):
                problems.append((str(path), number, line, f"{file_name!r} is not an image file name"))
            else:
                if file_name.count(".") > 1 and file_name not in report.odd_ids:
                    report.odd_ids.append(file_name)
                captions.setdefault(image_id(file_name), []).append(caption)
    report.malformed.extend(problems)
    _complain(problems, strict, warn)
    if not captions:
        what = "is empty" if not problems else f"has no valid caption line ({len(problems)} malformed)"
        raise ValueError(f"token file {str(path)!r} {what}: expected lines '<image>.jpg#<n><TAB><caption>'")
    return captions


def load_split(list_file, *, strict: bool = False, report: Report | None = None, warn: bool = True) -> set[str]:
    """Read a split list (one image file name a line) into a set of image ids (``warn``: as ``load_captions``)."""
    path = pathlib.Path(list_file)
    if not path.is_file():
        raise FileNotFoundError(f"list_file {str(path)!r} does not exist")
    ids, problems = set(), []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, raw in enumerate(f, start=1):
            name = raw.strip()
            if not name:
                continue
            if not _NAME.match(name):
                problems.append((str(path), number, name, "not an image file name"))
                continue
            ids.add(image_id(name))
    if report is not None:
        report.malformed.extend(problems)
    _complain(problems, strict, warn)
    if not ids:
        what = "is empty" if not problems else f"has no valid image name ({len(problems)} malformed line(s))"
        raise ValueError(f"split list {str(path)!r} {what}: expected one image file name a line, e.g. "
                         "'1000268201_693b08cb0e.jpg'")
    return ids


def find_file(root, name: str, folders=_TEXT_DIRS) -> pathlib.Path:
    """``root/<folder>/name`` for the first folder that has it; FileNotFoundError naming all tried."""
    root = pathlib.Path(root)
    tried = [root / folder / name for folder in folders]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{name} not found; looked in {', '.join(str(t.parent) for t in tried)}")


def find_images_dir(root) -> pathlib.Path | None:
    """The image folder under ``root`` (``Flicker8k_Dataset``, ``Flickr8k_Dataset`` or ``images``), or None."""
    for folder in _IMAGE_DIRS:
        if (pathlib.Path(root) / folder).is_dir():
            return pathlib.Path(root) / folder
    return None


@dataclasses.dataclass
class Flickr8k:
    """Raw captions per split, ``{split: {image_id: [caption, ...]}}``, and what did not fit."""

    splits: dict
    report: Report
    images_dir: pathlib.Path | None


def load(root, *, available_ids=None, strict: bool = False) -> Flickr8k:
    """Load the token file and the three split lists under ``root``.

    Args:
      root: the Flickr8k folder (text files directly in it or in ``Flickr8k_text/``).
      available_ids: ids that have an image (or feature vector); captions of other ids are dropped and listed
        in ``report.missing_images``. Default: the image folder's files if there is one, else no filtering.

    Skipped lines are listed in the result's ``report`` (``report.lines()``), not warned about.
    """
    report = Report()
    captions = load_captions(find_file(root, TOKEN_FILE), strict=strict, report=report, warn=False)
    images_dir = find_images_dir(root)
    if available_ids is None and images_dir is not None:
        available_ids = {image_id(p.name) for p in images_dir.iterdir() if _NAME.match(p.name)}
    splits = {}
    for split, name in SPLIT_FILES.items():
        ids = load_split(find_file(root, name), strict=strict, report=report, warn=False)
        report.split_without_captions[split] = sorted(i for i in ids if i not in captions)
        chosen = {}
        for i in sorted(ids):
            if i not in captions:
                continue
            if available_ids is not None and i not in available_ids:
                report.missing_images.append(i)
                continue
            chosen[i] = captions[i]
        splits[split] = chosen
    return Flickr8k(splits, report, images_dir)
