"""Parallel text for translation: readers, cleaning, tokenisation, vocabularies and length-bucketed batches.

Two formats:

* Tatoeba / manythings.org "anki" TSV: ``English<TAB>Vietnamese<TAB>attribution`` per line (the attribution
  column is optional in older releases and is kept with each pair, since CC-BY requires it).
* IWSLT text pairs (Stanford NMT preprocessing): two aligned files, one sentence per line, already tokenised,
  with Moses escapes (``&apos;``, ``&quot;``, ``&amp;``, ``&#91;`` ...).

Every line goes through ``clean``: a UTF-8 BOM and CR line endings are removed, Unicode NFC normalisation
makes decomposed Vietnamese diacritics compare equal to composed ones, and zero-width characters are dropped.

Bad lines are handled by an explicit ``policy`` (``"error"`` raises a ``ValueError`` naming the file and
line number; ``"drop"`` skips the pair and counts it in a ``ReadStats``).
"""
from __future__ import annotations

import collections
import dataclasses
import pathlib
import re
import unicodedata
from typing import Iterable, Sequence

import numpy as np

from jaxseq.data.vocab import Vocab

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIALS = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# Zero-width space/non-joiner/joiner, word joiner, BOM used mid-text: invisible, but they split or glue tokens.
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))

# Moses escapes used by the Stanford IWSLT files (tokenizer.perl -escape).
_MOSES_ESCAPES = {"&apos;": "'", "&quot;": '"', "&amp;": "&", "&lt;": "<", "&gt;": ">", "&#91;": "[",
                  "&#93;": "]", "&#124;": "|"}
_MOSES_RE = re.compile("|".join(map(re.escape, _MOSES_ESCAPES)))

# Words (letters/digits, with inner apostrophes or hyphens kept: "don't", "sô-cô-la") or single symbols.
_TOKEN_RE = re.compile(r"\w+(?:['’\-]\w+)*|[^\w\s]", re.UNICODE)

POLICIES = ("error", "drop")


def clean(text: str) -> str:
    """NFC-normalise, drop zero-width characters, BOM and CR, and collapse runs of whitespace."""
    text = unicodedata.normalize("NFC", text).translate(_ZERO_WIDTH)
    return " ".join(text.split())


def unescape_moses(text: str) -> str:
    """Undo Moses escapes (``&apos;`` -> ``'``, ``&quot;`` -> ``"``, ...); other ``&`` are left alone."""
    return _MOSES_RE.sub(lambda m: _MOSES_ESCAPES[m.group(0)], text)


def tokenize(text: str) -> list[str]:
    """Split cleaned raw text into word and punctuation tokens (``"Tom's here."`` -> ``Tom's here .``)."""
    return _TOKEN_RE.findall(text)


def whitespace_tokenize(text: str) -> list[str]:
    """Split on whitespace: for pre-tokenised corpora (IWSLT) whose tokens published BLEU scores count."""
    return text.split()


TOKENIZERS = {"regex": tokenize, "whitespace": whitespace_tokenize}


_NO_SPACE_BEFORE = set(".,!?;:%)]}…") | {"'s", "n't"}
_NO_SPACE_AFTER = set("([{")


def detokenize(tokens: Sequence[str]) -> str:
    """Join tokens into text: no space before closing punctuation or after opening brackets.

    Double quotes alternate between opening and closing. This is the inverse of ``tokenize`` on ordinary
    sentences; sacreBLEU re-tokenises the result with its own 13a tokenizer.
    """
    out: list[str] = []
    glue_next = False
    open_quote = False
    for tok in tokens:
        if tok == '"':
            if open_quote:
                out.append(tok)
            else:
                out.append(" " + tok if out else tok)
                glue_next = True
            open_quote = not open_quote
            continue
        if out and not glue_next and tok not in _NO_SPACE_BEFORE:
            out.append(" ")
        out.append(tok)
        glue_next = tok in _NO_SPACE_AFTER
    return "".join(out).strip()


@dataclasses.dataclass(frozen=True)
class Pair:
    """One sentence pair: ``source`` and ``target`` text, where it came from, and its attribution."""

    source: str
    target: str
    line: int
    attribution: str = ""


@dataclasses.dataclass
class ReadStats:
    """What a reader kept and dropped (each drop counted under its reason)."""

    kept: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def summary(self) -> str:
        drops = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) or "none"
        return f"kept {self.kept} pairs; dropped: {drops}"


def _check_policy(name: str, policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"{name} must be one of {POLICIES}, got {policy!r}")


def read_lines(path: pathlib.Path) -> list[str]:
    """The lines of a UTF-8 text file split on "\\n" (a leading BOM dropped; callers' cleaning removes CRs)."""
    # utf-8-sig strips a leading BOM; splitting on "\n" and cleaning removes CRs, so CRLF files read the same.
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[:error.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not valid UTF-8 ({error.reason})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line rather than starting an empty one
    return lines


def read_tatoeba(path, *, empty: str = "drop", stats: ReadStats | None = None) -> list[Pair]:
    """Read an anki/Tatoeba TSV (``English<TAB>other<TAB>[attribution]``) into a list of ``Pair``.

    Args:
      path: the ``.txt`` file.
      empty: policy for lines with an empty side (``"drop"`` counts them in ``stats``; ``"error"`` raises).
      stats: optional ``ReadStats`` to fill.

    Raises:
      ValueError: a line without a tab or with more than three columns (the file is not this format), with
        the line number.
    """
    _check_policy("empty", empty)
    path = pathlib.Path(path)
    stats = stats if stats is not None else ReadStats()
    lines = read_lines(path)
    if not any(line.strip() for line in lines):
        raise ValueError(f"{path} is empty: expected lines 'English<TAB>translation<TAB>attribution'")
    pairs = []
    for number, raw in enumerate(lines, start=1):
        fields = raw.rstrip("\r").split("\t")
        if len(fields) not in (2, 3):
            raise ValueError(f"{path}: line {number} has {len(fields)} tab-separated fields, expected "
                             f"'English<TAB>translation<TAB>attribution' (2 or 3 fields): {raw[:80]!r}")
        source, target = clean(fields[0]), clean(fields[1])
        if not source or not target:
            if empty == "error":
                raise ValueError(f"{path}: line {number} has an empty {'source' if not source else 'target'}")
            stats.dropped["empty"] += 1
            continue
        pairs.append(Pair(source, target, number, clean(fields[2]) if len(fields) == 3 else ""))
    stats.kept += len(pairs)
    return pairs


def read_parallel(source_path, target_path, *, empty: str = "drop", stats: ReadStats | None = None,
                  moses_escaped: bool = True) -> list[Pair]:
    """Read two aligned files (one sentence per line, e.g. IWSLT ``train.en`` / ``train.vi``).

    Raises:
      ValueError: different line counts (misaligned files), naming both counts; with ``empty="error"``, an
        empty line, naming the file and line number.
    """
    _check_policy("empty", empty)
    source_path, target_path = pathlib.Path(source_path), pathlib.Path(target_path)
    src, tgt = read_lines(source_path), read_lines(target_path)
    for path, lines in ((source_path, src), (target_path, tgt)):
        if not any(line.strip() for line in lines):
            raise ValueError(f"{path} is empty: expected one sentence per line")
    if len(src) != len(tgt):
        raise ValueError(f"misaligned parallel files: {source_path} has {len(src)} lines but {target_path} "
                         f"has {len(tgt)}; line {min(len(src), len(tgt)) + 1} has no partner")
    stats = stats if stats is not None else ReadStats()
    pairs = []
    for number, (s, t) in enumerate(zip(src, tgt), start=1):
        if moses_escaped:
            s, t = unescape_moses(s), unescape_moses(t)
        s, t = clean(s), clean(t)
        if not s or not t:
            if empty == "error":
                which = source_path if not s else target_path
                raise ValueError(f"{which}: line {number} is empty")
            stats.dropped["empty"] += 1
            continue
        pairs.append(Pair(s, t, number))
    stats.kept += len(pairs)
    return pairs


def filter_length(pairs: Iterable[Pair], max_len: int, *, too_long: str = "drop",
                  stats: ReadStats | None = None, tokenizer=tokenize) -> list[Pair]:
    """Keep pairs whose two sides both have at most ``max_len`` tokens.

    ``too_long="drop"`` counts the others in ``stats.dropped["longer than max_len"]``; ``"error"`` raises with
    the pair's line number.
    """
    _check_policy("too_long", too_long)
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    kept = []
    for pair in pairs:
        n_src, n_tgt = len(tokenizer(pair.source)), len(tokenizer(pair.target))
        if max(n_src, n_tgt) > max_len:
            if too_long == "error":
                raise ValueError(f"line {pair.line}: sentence of {max(n_src, n_tgt)} tokens is longer than "
                                 f"max_len={max_len}")
            if stats is not None:
                stats.dropped[f"longer than {max_len} tokens"] += 1
                stats.kept -= 1
            continue
        kept.append(pair)
    return kept


def split_by_source(pairs: Sequence[Pair], *, dev: int, test: int, seed: int = 0):
    """Split into (train, dev, test) so that no source sentence appears in two splits.

    Tatoeba gives several translations of one English sentence; grouping by source keeps a dev sentence from
    being memorised in training. ``dev`` and ``test`` are numbers of source sentences; groups are shuffled with
    ``seed``.
    """
    for name, size in (("dev", dev), ("test", test)):
        if not isinstance(size, (int, np.integer)) or size < 0:
            raise ValueError(f"{name} must be a number of source sentences >= 0, got {size!r}")
    groups: dict[str, list[Pair]] = collections.defaultdict(list)
    for pair in pairs:
        groups[pair.source].append(pair)
    keys = sorted(groups)
    if dev + test >= len(keys):
        raise ValueError(f"dev + test = {dev + test} source sentences, but only {len(keys)} distinct ones")
    order = np.random.default_rng(seed).permutation(len(keys))
    pick = lambda idx: [p for i in idx for p in groups[keys[i]]]  # noqa: E731
    return pick(order[dev + test:]), pick(order[:dev]), pick(order[dev:dev + test])


def build_vocab(sentences: Iterable[Sequence[str]], *, min_count: int = 1, max_size: int | None = None) -> Vocab:
    """Tokens seen at least ``min_count`` times, most frequent first (ties by first appearance), after
    ``<pad> <unk> <s> </s>``; at most ``max_size`` entries including those four."""
    return Vocab.build(sentences, min_count=min_count, max_size=max_size, pad=PAD, reserved=SPECIALS[1:],
                       unknown=UNK, start=BOS, end=EOS)


def vocab_from_tokens(tokens: Sequence[str]) -> Vocab:
    """A translation vocabulary of ``tokens`` in order, with the four specials put in front if they are not."""
    tokens = list(tokens)
    if tuple(tokens[:4]) != SPECIALS:
        tokens = list(SPECIALS) + [t for t in tokens if t not in SPECIALS]
    return Vocab(tuple(tokens), unknown=UNK, start=BOS, end=EOS)


def load_vocab(path) -> Vocab:
    """One token a line, as ``Vocab.save`` writes (Stanford ``vocab.vi`` files start ``<unk> <s> </s>``;
    ``<pad>`` is added)."""
    return vocab_from_tokens([clean(t) for t in read_lines(pathlib.Path(path)) if clean(t)])


@dataclasses.dataclass(frozen=True)
class EncodedPairs:
    """Pairs as id lists: ``source`` without specials, ``target`` ending in ``</s>``."""

    source: list[list[int]]
    target: list[list[int]]

    @classmethod
    def from_pairs(cls, pairs: Sequence[Pair], src_vocab: Vocab, tgt_vocab: Vocab,
                   *, tokenizer=tokenize) -> "EncodedPairs":
        return cls([src_vocab.encode(tokenizer(p.source)) for p in pairs],
                   [tgt_vocab.encode(tokenizer(p.target), add_end=True) for p in pairs])

    def __len__(self) -> int:
        return len(self.source)


def bucket_width(length: int, widths: Sequence[int]) -> int:
    """The smallest width in ``widths`` that holds ``length`` (a few fixed shapes keep jit recompiles few)."""
    for w in widths:
        if length <= w:
            return w
    raise ValueError(f"length {length} exceeds the largest bucket width {widths[-1]}")


def make_batch(source: Sequence[Sequence[int]], target: Sequence[Sequence[int]], *, batch_size: int,
               src_width: int, tgt_width: int) -> dict[str, np.ndarray]:
    """Pad a list of examples into fixed-shape arrays.

    Returns ``src int32[batch, src_width]``, ``src_len int32[batch]``, ``tgt_in int32[batch, tgt_width]``
    (``<s>`` then the target shifted right), ``tgt_out int32[batch, tgt_width]`` (the target ending ``</s>``)
    and ``tgt_len int32[batch]``. Rows past ``len(source)`` are empty (lengths 0) so the batch dimension stays
    ``batch_size``; the loss gives them no weight.
    """
    src = np.zeros((batch_size, src_width), np.int32)
    tgt_in = np.zeros((batch_size, tgt_width), np.int32)
    tgt_out = np.zeros((batch_size, tgt_width), np.int32)
    src_len = np.zeros(batch_size, np.int32)
    tgt_len = np.zeros(batch_size, np.int32)
    for row, (s, t) in enumerate(zip(source, target)):
        src[row, :len(s)] = s
        tgt_out[row, :len(t)] = t
        tgt_in[row, 0] = BOS_ID
        tgt_in[row, 1:len(t)] = t[:-1]
        src_len[row], tgt_len[row] = len(s), len(t)
    return {"src": src, "src_len": src_len, "tgt_in": tgt_in, "tgt_out": tgt_out, "tgt_len": tgt_len}


# Coarse on purpose: each (source, target) width pair is one jit compilation. Target widths count the </s>.
DEFAULT_WIDTHS = (7, 10, 13, 17, 21, 26, 33, 41, 51, 65, 81, 101, 129)


class BucketedBatches:
    """Length-bucketed translation batches implementing the training contract's ``BatchSource``.

    Examples are grouped by (source width, target width) on the grid ``widths``; each epoch shuffles inside
    every bucket, cuts batches of ``batch_size`` and shuffles the batch order, all from
    ``np.random.default_rng([seed, epoch])``, so ``batch(epoch, index)`` is a pure function of its arguments
    (exact resume). A bucket's last partial batch is padded with empty rows rather than dropped.

    With ``bucketing=False`` every batch is a random sample padded to the longest example of the whole data set
    (the baseline the benchmark compares against).
    """

    def __init__(self, data: EncodedPairs, batch_size: int, *, seed: int, bucketing: bool = True,
                 widths: Sequence[int] = DEFAULT_WIDTHS):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(data) == 0:
            raise ValueError("no examples to batch (did length filtering drop everything?)")
        self.data, self.batch_size, self.seed, self.bucketing = data, batch_size, seed, bucketing
        widths = sorted(widths)
        src_w = [bucket_width(max(len(s), 1), widths) for s in data.source]
        tgt_w = [bucket_width(len(t), widths) for t in data.target]
        if bucketing:
            keys = list(zip(src_w, tgt_w))
        else:
            keys = [(max(src_w), max(tgt_w))] * len(data)
        buckets: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
        for i, k in enumerate(keys):
            buckets[k].append(i)
        self._buckets = sorted(buckets.items())
        self._plan_epoch, self._plan = None, None

    def _plan_for(self, epoch: int) -> list[tuple[tuple[int, int], np.ndarray]]:
        if self._plan_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            plan = []
            for shape, idx in self._buckets:
                idx = rng.permutation(idx)
                plan += [(shape, idx[i:i + self.batch_size]) for i in range(0, len(idx), self.batch_size)]
            order = rng.permutation(len(plan))
            self._plan, self._plan_epoch = [plan[i] for i in order], epoch
        return self._plan

    def num_batches(self, epoch: int) -> int:
        return len(self._plan_for(epoch))

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        plan = self._plan_for(epoch)
        if not 0 <= index < len(plan):
            raise IndexError(f"batch index {index} out of range: epoch {epoch} has {len(plan)} batches "
                             f"(valid indices 0..{len(plan) - 1})")
        (src_width, tgt_width), idx = plan[index]
        return make_batch([self.data.source[i] for i in idx], [self.data.target[i] for i in idx],
                          batch_size=self.batch_size, src_width=src_width, tgt_width=tgt_width)

    def shapes(self) -> list[tuple[int, int]]:
        """The distinct (source width, target width) shapes, i.e. the number of jit compilations."""
        return [shape for shape, _ in self._buckets]

    def real_tokens(self) -> int:
        """Target tokens per epoch (padding excluded): the numerator of tokens/s."""
        return sum(len(t) for t in self.data.target)


# --- corpora -------------------------------------------------------------------------------------------

TATOEBA_FILE = pathlib.Path(__file__).resolve().parent.parent / "datasets" / "tatoeba" / "vie.txt"


@dataclasses.dataclass
class Corpus:
    """Train/dev/test pairs and what reading them dropped."""

    train: list[Pair]
    dev: list[Pair]
    test: list[Pair]
    stats: ReadStats
    name: str
    tokenizer: str  # a key of TOKENIZERS


def load_tatoeba(path=TATOEBA_FILE, *, max_len: int, dev: int = 500, test: int = 500, seed: int = 0) -> Corpus:
    """The shipped Tatoeba en-vi pairs, split by English sentence, train filtered to ``max_len`` tokens.

    Dev and test keep every length (the BLEU-vs-length plot needs long sentences the model never trained on).
    """
    stats = ReadStats()
    pairs = read_tatoeba(path, stats=stats)
    try:
        train, dev_pairs, test_pairs = split_by_source(pairs, dev=dev, test=test, seed=seed)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    train = filter_length(train, max_len, stats=stats)
    return Corpus(train, dev_pairs, test_pairs, stats, f"tatoeba:{pathlib.Path(path).name}", "regex")


def load_iwslt_dir(folder, *, max_len: int, src: str = "en", tgt: str = "vi") -> Corpus:
    """An IWSLT-style folder: ``train.{src,tgt}``, dev ``tst2012.*`` (or ``dev.*``), test ``tst2013.*`` if present.

    These files are pre-tokenised and Moses-escaped (Stanford preprocessing); train is filtered to ``max_len``.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--data {folder}: not a folder (expected train.{src}, train.{tgt}, tst2012.*)")
    stats = ReadStats()

    def read(stem, required):
        s, t = folder / f"{stem}.{src}", folder / f"{stem}.{tgt}"
        if not (s.is_file() and t.is_file()):
            if required:
                raise FileNotFoundError(f"{folder}: needs {s.name} and {t.name}")
            return None
        return read_parallel(s, t, stats=stats if stem == "train" else None)

    train = filter_length(read("train", True), max_len, stats=stats, tokenizer=whitespace_tokenize)
    dev = read("tst2012", False) or read("dev", False)
    if dev is None:
        raise FileNotFoundError(f"{folder}: needs a dev set tst2012.{src}/{tgt} or dev.{src}/{tgt}")
    test = read("tst2013", False) or read("test", False) or []
    return Corpus(train, dev, test, stats, f"dir:{folder.name}", "whitespace")


def save_vocabs(out_dir, src_vocab: Vocab, tgt_vocab: Vocab) -> None:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src_vocab.save(out_dir / "vocab.src")
    tgt_vocab.save(out_dir / "vocab.tgt")


def load_vocabs(out_dir) -> tuple[Vocab, Vocab]:
    out_dir = pathlib.Path(out_dir)
    for name in ("vocab.src", "vocab.tgt"):
        if not (out_dir / name).is_file():
            raise FileNotFoundError(f"{out_dir / name} not found: is {out_dir} a 'jaxseq translate train' run?")
    return load_vocab(out_dir / "vocab.src"), load_vocab(out_dir / "vocab.tgt")


