"""Translation data (readers, cleaning, vocab, buckets), the seq2seq model and the translate command."""
import hashlib
import json
import unicodedata

import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq import cli, decoding, metrics, training
from jaxseq.tasks import translate
from jaxseq.data import translation as tr
from jaxseq.models import seq2seq


# --- cleaning and tokenisation ---------------------------------------------------------------------------------

def test_clean_composes_vietnamese_and_drops_zero_width():
    composed = "Tôi thích dạy học"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    assert tr.clean(decomposed) == composed
    assert tr.clean("\ufeffTôi\u200b thích\u200d  dạy\r") == "Tôi thích dạy"


def test_moses_unescape_and_whitespace_tokens():
    line = "It &apos;s a &quot; test &quot; &amp; &#91;more&#93; &amp;quot;"
    assert tr.unescape_moses(line) == "It 's a \" test \" & [more] &quot;"
    assert tr.whitespace_tokenize(tr.unescape_moses("don &apos;t")) == ["don", "'t"]


@pytest.mark.parametrize("text", ["Tom said that he's not sleepy.", 'He said "I don\'t know (really)," and left.',
                                  "Cho dù bạn có sô-cô-la, nó vẫn là va-ni!", "Wait... 50% off?"])
def test_detokenize_inverts_tokenize(text):
    assert tr.detokenize(tr.tokenize(text)) == text


def test_tokenize_keeps_words_whole():
    assert tr.tokenize("Tom's sô-cô-la, ok?") == ["Tom's", "sô-cô-la", ",", "ok", "?"]


# --- readers ---------------------------------------------------------------------------------------------------

def test_read_tatoeba_with_bom_crlf_and_attribution(tmp_path):
    f = tmp_path / "vie.txt"
    f.write_bytes("\ufeffRun!\tChạy!\tCC-BY 2.0 (France) Attribution: tatoeba.org #1 (a) & #2 (b)\r\n"
                  "Hi.\t\tCC-BY\r\n"
                  "Who?\tAi?\r\n".encode("utf-8"))
    stats = tr.ReadStats()
    pairs = tr.read_tatoeba(f, stats=stats)
    assert [(p.source, p.target, p.line) for p in pairs] == [("Run!", "Chạy!", 1), ("Who?", "Ai?", 3)]
    assert pairs[0].attribution.startswith("CC-BY 2.0 (France) Attribution: tatoeba.org #1")
    assert stats.kept == 2 and stats.dropped == {"empty": 1}
    with pytest.raises(ValueError, match="line 2 has an empty target"):
        tr.read_tatoeba(f, empty="error")


def test_read_tatoeba_rejects_wrong_columns_with_line_number(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_text("Run!\tChạy!\tCC\nno tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 has 1 tab-separated fields"):
        tr.read_tatoeba(f)
    with pytest.raises(ValueError, match="empty must be one of"):
        tr.read_tatoeba(f, empty="skip")


def test_read_parallel_misaligned_and_empty_lines(tmp_path):
    en, vi = tmp_path / "a.en", tmp_path / "a.vi"
    en.write_bytes(b"\xef\xbb\xbfHello .\r\n\r\nIt &apos;s me .\r\n")
    vi.write_text("Xin chào .\nTrống\nLà tôi .\n", encoding="utf-8")
    stats = tr.ReadStats()
    pairs = tr.read_parallel(en, vi, stats=stats)
    assert [(p.source, p.line) for p in pairs] == [("Hello .", 1), ("It 's me .", 3)]
    assert stats.dropped == {"empty": 1}
    with pytest.raises(ValueError, match=r"a\.en: line 2 is empty"):
        tr.read_parallel(en, vi, empty="error")
    vi.write_text("Xin chào .\nLà tôi .\n", encoding="utf-8")
    with pytest.raises(ValueError, match="misaligned.*has 3 lines.*has 2; line 3 has no partner"):
        tr.read_parallel(en, vi)


def test_invalid_utf8_names_the_line(tmp_path):
    f = tmp_path / "x.txt"
    f.write_bytes(b"ok\tok\nbad \xff\tx\n")
    with pytest.raises(ValueError, match="line 2 is not valid UTF-8"):
        tr.read_tatoeba(f)


def test_filter_length_policy():
    pairs = [tr.Pair("a b c", "x", 1), tr.Pair("a", "x y z w", 2), tr.Pair("a", "x", 3)]
    stats = tr.ReadStats(kept=3)
    assert [p.line for p in tr.filter_length(pairs, 3, stats=stats)] == [1, 3]
    assert stats.dropped == {"longer than 3 tokens": 1} and stats.kept == 2
    with pytest.raises(ValueError, match="line 2: sentence of 4 tokens is longer than max_len=3"):
        tr.filter_length(pairs, 3, too_long="error")


def test_split_by_source_never_shares_a_sentence():
    pairs = [tr.Pair(f"s{i % 30}", f"t{i}", i) for i in range(90)]
    train, dev, test = tr.split_by_source(pairs, dev=5, test=5, seed=1)
    sources = [{p.source for p in split} for split in (train, dev, test)]
    assert len(train) + len(dev) + len(test) == 90
    assert not (sources[0] & sources[1]) and not (sources[0] & sources[2]) and not (sources[1] & sources[2])
    assert len(sources[1]) == 5 and len(dev) == 15


def test_split_sizes_must_not_be_negative(tmp_path):
    pairs = [tr.Pair(f"s{i}", f"t{i}", i) for i in range(10)]
    with pytest.raises(ValueError, match="dev must be a number of source sentences >= 0, got -1"):
        tr.split_by_source(pairs, dev=-1, test=1)
    path = tmp_path / "pairs.txt"
    path.write_text("".join(f"s{i}\tt{i}\n" for i in range(10)))
    with pytest.raises(ValueError, match=f"{path}: dev must be a number"):
        tr.load_tatoeba(path, max_len=10, dev=-1, test=1)


def test_empty_files_are_named(tmp_path):
    empty, other = tmp_path / "empty.tsv", tmp_path / "one.vi"
    empty.write_text("")
    other.write_text("xin chào\n")
    with pytest.raises(ValueError, match=f"{empty} is empty"):
        tr.read_tatoeba(empty)
    with pytest.raises(ValueError, match=f"{empty} is empty"):
        tr.load_tatoeba(empty, max_len=10)
    with pytest.raises(ValueError, match=f"{empty} is empty"):
        tr.read_parallel(empty, empty)


def test_vocab_decode_and_batch_index_name_the_range():
    vocab = tr.vocab_from_tokens(["hello"])
    assert vocab.decode([4, tr.EOS_ID, 999]) == ["hello"]  # stops at </s>
    for bad in (999, -1):
        with pytest.raises(ValueError, match=rf"index {bad} is not in the vocabulary: valid indices are 0\.\.4"):
            vocab.decode([bad])
    source = tr.BucketedBatches(_toy_data(), 8, seed=0)
    with pytest.raises(IndexError, match=rf"batch index 99 out of range: epoch 0 has {source.num_batches(0)} "):
        source.batch(0, 99)
    with pytest.raises(IndexError, match="batch index -1 out of range"):
        source.batch(0, -1)


# --- vocabulary and batches ------------------------------------------------------------------------------------

def test_vocab_min_count_max_size_and_specials(tmp_path):
    sents = [["a", "b", "a"], ["c", "a", "b"], ["d"]]
    v = tr.build_vocab(sents, min_count=2)
    assert v.tokens == ("<pad>", "<unk>", "<s>", "</s>", "a", "b")
    assert tr.build_vocab(sents, max_size=5).tokens[4:] == ("a",)
    assert v.encode(["a", "zzz"], add_start=True, add_end=True) == [tr.BOS_ID, 4, tr.UNK_ID, tr.EOS_ID]
    assert v.decode([tr.BOS_ID, 4, 5, tr.EOS_ID, 4]) == ["a", "b"]
    v.save(tmp_path / "v.txt")
    assert tr.load_vocab(tmp_path / "v.txt").tokens == v.tokens
    # A Stanford vocabulary starts "<unk> <s> </s>" without <pad>: the specials are put in front.
    (tmp_path / "vocab.vi").write_text("<unk>\n<s>\n</s>\nKhoa\nhọc\n", encoding="utf-8")
    assert tr.load_vocab(tmp_path / "vocab.vi").tokens == ("<pad>", "<unk>", "<s>", "</s>", "Khoa", "học")
    with pytest.raises(ValueError, match="min_count"):
        tr.build_vocab(sents, min_count=0)


def _toy_data(n=50, seed=0):
    rng = np.random.default_rng(seed)
    src = [list(rng.integers(4, 20, rng.integers(1, 15))) for _ in range(n)]
    tgt = [list(rng.integers(4, 20, rng.integers(1, 15))) + [tr.EOS_ID] for _ in range(n)]
    return tr.EncodedPairs(src, tgt)


def test_make_batch_shifts_target_and_pads():
    b = tr.make_batch([[5, 6]], [[7, 8, tr.EOS_ID]], batch_size=2, src_width=3, tgt_width=4)
    np.testing.assert_array_equal(b["src"], [[5, 6, 0], [0, 0, 0]])
    np.testing.assert_array_equal(b["tgt_in"], [[tr.BOS_ID, 7, 8, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b["tgt_out"], [[7, 8, tr.EOS_ID, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b["src_len"], [2, 0])
    np.testing.assert_array_equal(b["tgt_len"], [3, 0])


@pytest.mark.parametrize("bucketing", [True, False])
def test_bucketed_batches_cover_each_example_once_and_are_pure(bucketing):
    data = _toy_data()
    source = tr.BucketedBatches(data, 8, seed=3, bucketing=bucketing, widths=(5, 10, 16))
    seen = []
    for i in range(source.num_batches(1)):
        b = source.batch(1, i)
        assert b["src"].shape[0] == 8
        assert b["src"].shape[1] in (5, 10, 16) and b["tgt_out"].shape[1] in (5, 10, 16)
        for row in range(8):
            if b["tgt_len"][row]:
                seen.append(tuple(b["tgt_out"][row, :b["tgt_len"][row]]))
    assert sorted(seen) == sorted(tuple(t) for t in data.target)
    fresh = tr.BucketedBatches(data, 8, seed=3, bucketing=bucketing, widths=(5, 10, 16))
    for name, value in source.batch(1, 2).items():  # same (seed, epoch, index) -> same bytes, new object
        np.testing.assert_array_equal(fresh.batch(1, 2)[name], value)
    if bucketing:
        assert len(source.shapes()) > 1
    else:
        assert source.shapes() == [(16, 16)]


def test_bucketing_pads_less_than_padding_to_max():
    data = _toy_data(200)
    padded = lambda s: sum(s.batch(0, i)["tgt_out"].size for i in range(s.num_batches(0)))  # noqa: E731
    bucketed = tr.BucketedBatches(data, 8, seed=0, widths=(5, 10, 16))
    flat = tr.BucketedBatches(data, 8, seed=0, bucketing=False, widths=(5, 10, 16))
    assert padded(bucketed) < padded(flat)
    with pytest.raises(ValueError, match="exceeds the largest bucket width 10"):
        tr.BucketedBatches(data, 8, seed=0, widths=(5, 10))


# --- model -----------------------------------------------------------------------------------------------------

def _tiny(attention, cell="lstm", bidirectional=True):
    return seq2seq.Seq2SeqConfig(src_vocab=20, tgt_vocab=20, embed=6, hidden=4, cell=cell,
                                 bidirectional=bidirectional, attention=attention, max_src_len=12, dropout=0.0)


# Every score function's masking is tested in test_attention.py; here the model's wiring, one compile each.
@pytest.mark.parametrize("attention,cell,bidirectional", [("additive", "lstm", True), ("none", "gru", True),
                                                          ("location", "gru", False)])
def test_loss_ignores_padding(attention, cell, bidirectional, key):
    config = _tiny(attention, cell, bidirectional)
    params = seq2seq.init_params(config, key)
    data = _toy_data(4, seed=1)
    data = tr.EncodedPairs([s[:8] for s in data.source], data.target)
    narrow = tr.make_batch(data.source, data.target, batch_size=4, src_width=8, tgt_width=15)
    wide = tr.make_batch(data.source, data.target, batch_size=6, src_width=12, tgt_width=18)
    wide["src"][:, 8:] = 7  # junk after the lengths: must not matter
    loss_n, aux_n = seq2seq.loss_fn(config, params, narrow)
    loss_w, aux_w = seq2seq.loss_fn(config, params, wide)
    np.testing.assert_allclose(loss_w, loss_n, rtol=1e-5)
    assert float(aux_n["tokens"]) == sum(len(t) for t in data.target)
    _, weights = seq2seq.decode_teacher_forced(config, params, seq2seq.encode(config, params, wide["src"],
                                                                               wide["src_len"]), wide["tgt_in"])
    mask = np.arange(12)[None, None, :] >= wide["src_len"][:, None, None]
    assert np.all(np.asarray(weights)[np.broadcast_to(mask, weights.shape)] == 0.0)


def test_greedy_decoding_agrees_with_teacher_forcing(key):
    """The step function carries the state: re-reading greedy's own output gives the same argmaxes."""
    config = _tiny("general")
    params = seq2seq.init_params(config, key)
    src = jnp.array([[5, 6, 7, 0], [8, 9, 0, 0]], jnp.int32)
    src_len = jnp.array([3, 2])
    state = seq2seq.encode(config, params, src, src_len)
    start = jnp.full((2,), tr.BOS_ID, jnp.int32)
    tokens, lengths = decoding.greedy(seq2seq.make_step_fn(config, params), state, start, max_len=6,
                                      end_token=tr.EOS_ID)
    tgt_in = jnp.concatenate([start[:, None], tokens[:, :-1]], axis=1)
    logits, _ = seq2seq.decode_teacher_forced(config, params, state, tgt_in)
    logits = logits.at[..., 0].set(-jnp.inf)  # decoding never emits padding
    for row in range(2):
        n = int(lengths[row])
        np.testing.assert_array_equal(np.argmax(logits[row, :n], -1), tokens[row, :n])


def test_config_errors():
    with pytest.raises(ValueError, match="attention must be one of"):
        _tiny("bahdanau")
    with pytest.raises(ValueError, match="cell must be one of"):
        _tiny("dot", cell="rnn")


# --- metrics ---------------------------------------------------------------------------------------------------

def test_bleu_metrics():
    score, signature = metrics.corpus_bleu(["Tôi thích dạy học ."], ["Tôi thích dạy học ."])
    assert score == pytest.approx(100.0) and "tok:13a" in signature
    assert metrics.tokenized_bleu([["a", "b", "c", "d"]], [["a", "b", "c", "e"]]) < 100.0
    rows = metrics.bleu_by_length(["a b c d e"] * 3, ["a b c d e"] * 3, [2, 6, 20], [1, 5, 13])
    assert [(r["bin"], r["sentences"]) for r in rows] == [("1-4", 1), ("5-12", 1), ("13+", 1)]
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        metrics.corpus_bleu(["a", "b"], ["a"])


def test_tatoeba_hold_out_does_not_follow_the_training_seed(monkeypatch, tmp_path):
    # Seeds must be scored on the same dev and test sentences, or their spread mixes in the split's.
    seen = []

    def stop_after_reading(*args, seed, **kwargs):
        seen.append(seed)
        raise LookupError("read")
    monkeypatch.setattr(tr, "load_tatoeba", stop_after_reading)
    for seed in (0, 1):
        with pytest.raises(LookupError):
            translate.train_and_evaluate(translate.TranslateConfig(),
                                         training.TrainConfig(out_dir=str(tmp_path / str(seed)), seed=seed))
    assert seen == [0, 0]


# --- command line, end to end on a tiny IWSLT-style folder -----------------------------------------------------

def test_translate_train_eval_predict(tmp_path, capsys, monkeypatch):
    data = tmp_path / "iwslt"
    data.mkdir()
    en = ["I love teaching .", "I love music .", "You love music .", "It &apos;s good ."] * 4
    vi = ["Tôi thích dạy học .", "Tôi thích âm nhạc .", "Bạn thích âm nhạc .", "Nó tốt ."] * 4
    (data / "train.en").write_text("\n".join(en) + "\n", encoding="utf-8")
    (data / "train.vi").write_text("\r\n".join(vi) + "\r\n", encoding="utf-8")
    (data / "tst2012.en").write_text("\ufeff" + "\n".join(en[:4]) + "\n", encoding="utf-8")
    (data / "tst2012.vi").write_text("\n".join(vi[:4]) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # --data given relative to here; --split below runs from another folder
    args = ["translate", "train", "--data", "iwslt", "--attention", "dot", "--epochs", "2", "--out", str(run),
            "--hidden", "4", "--embed", "4", "--max-len", "6", "--min-count", "1", "--batch-size", "8",
            "--bucket-widths", "8", "--beam", "2", "--no-progress"]
    assert cli.main(args) == 0
    results = json.loads((run / "metrics.json").read_text())
    assert results["dev_pairs"] == 4 and results["train_pairs"] == 16
    assert "tok:13a" in results["dev"]["sacrebleu_signature"]
    assert len((run / "dev.hyp").read_text(encoding="utf-8").splitlines()) == 4
    assert cli.main(args) == 0  # a finished run is not retrained; it says so
    assert "already finished" in capsys.readouterr().out
    # Other settings on the same folder are refused before the run's vocabularies or model.json change.
    kept = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file() and f.suffix not in (".png", ".lock")}
    other = args.copy()
    other[other.index("--min-count") + 1] = "2"
    assert cli.main(other) == 2
    assert "different run_config" in capsys.readouterr().err
    assert {name: (run / name).read_bytes() for name in kept} == kept

    hyp = tmp_path / "hyp.txt"
    assert cli.main(["translate", "eval", "--run", str(run), "--src", str(data / "tst2012.en"), "--ref",
                     str(data / "tst2012.vi"), "--hyp-out", str(hyp), "--beam", "2"]) == 0
    out = capsys.readouterr().out
    assert "sacreBLEU" in out and "signature: nrefs:1" in out and "tokenised BLEU" in out
    assert len(hyp.read_text(encoding="utf-8").splitlines()) == 4

    plot = tmp_path / "attn.png"
    assert cli.main(["translate", "predict", "--run", str(run), "I love teaching", "--beam", "2",
                     "--plot", str(plot)]) == 0
    assert plot.stat().st_size > 1000

    assert cli.main(["translate", "compare", str(run), "--plot", str(tmp_path / "bleu.png")]) == 0
    out = capsys.readouterr().out
    assert "| dot | 2 |" in out and (tmp_path / "bleu.png").is_file()

    # The run's own held-out splits: dev reproduces metrics.json; test needs tst2013 in the data folder.
    monkeypatch.chdir(run)
    assert cli.main(["translate", "eval", "--run", str(run), "--split", "dev", "--beam", "2"]) == 0
    assert f"sacreBLEU {results['dev']['sacrebleu']:.2f}" in capsys.readouterr().out
    assert cli.main(["translate", "eval", "--run", str(run), "--split", "test"]) == 2
    assert "has no test split" in capsys.readouterr().err
    (data / "tst2013.en").write_text("\n".join(en[1:3]) + "\n", encoding="utf-8")
    (data / "tst2013.vi").write_text("\n".join(vi[1:3]) + "\n", encoding="utf-8")
    report, detok = translate.evaluate_split(run, "test", beam=2)
    assert report["sentences"] == 2 and len(detok) == 2
    assert cli.main(["translate", "eval", "--run", str(run), "--split", "test", "--src", "a.en"]) == 2
    assert "either --split or --src" in capsys.readouterr().err
    assert cli.main(["translate", "eval", "--run", str(run), "--src", "a.en"]) == 2
    assert "expected --split dev|test" in capsys.readouterr().err

    (data / "bad.vi").write_text("only one line\n", encoding="utf-8")
    assert cli.main(["translate", "eval", "--run", str(run), "--src", str(data / "tst2012.en"), "--ref",
                     str(data / "bad.vi")]) == 2
    assert "misaligned files" in capsys.readouterr().err
    assert cli.main(["translate", "predict", "--run", str(tmp_path / "nope"), "hi"]) == 2


# --- real data -------------------------------------------------------------------------------------------------

def test_shipped_tatoeba_is_the_shared_file(shared_data):
    shared = shared_data / "en-vi" / "tatoeba" / "vie.txt"
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(tr.TATOEBA_FILE) == digest(shared)
    pairs = tr.read_tatoeba(tr.TATOEBA_FILE)
    assert len(pairs) == 9189 and all(p.attribution.startswith("CC-BY 2.0 (France)") for p in pairs)
    assert not any("\u200b" in p.target for p in pairs)  # line 7531 had two U+200B


def test_iwslt_dev_set_reads_aligned_and_unescaped(shared_data):
    folder = shared_data / "en-vi"
    pairs = tr.read_parallel(folder / "tst2012.en", folder / "tst2012.vi", empty="error")
    assert len(pairs) == 1553
    assert not any("&apos;" in p.source or "&quot;" in p.target for p in pairs)
    vocab = tr.load_vocab(folder / "vocab.vi")
    # Stanford's 7,709 lines + <pad>, less line 6511: a lone U+200B token, which cleaning removes.
    assert len(vocab) == 7709 + 1 - 1 and vocab.tokens[:4] == tr.SPECIALS
    assert "\u200b" not in vocab.tokens
