"""Captioning: the chapter's text figures on the real file, loaders, the merge model against the chapter's
objective and decoding loop, the variants, synthetic data, BLEU and the command line."""
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_trees_close, import_or_skip
from jaxseq import metrics
from jaxseq.data import flickr8k, glove, synthetic_captions as sc
from jaxseq.data.text import caption_vocab, clean_caption, wrap
from jaxseq.data.vocab import Vocab
from jaxseq.models import captioning as cap


# --- text -------------------------------------------------------------------------------------------------------

def test_clean_caption_follows_the_chapter():
    assert clean_caption("A child in a pink dress is climbing up a set of stairs in an entry way .") == \
        "child in pink dress is climbing up set of stairs in an entry way"
    assert clean_caption("Two dogs' toys, 3 balls and a 2nd-hand  frisbee!") == "two dogs toys balls and frisbee"
    assert wrap("dog runs") == "startseq dog runs endseq"


def test_vocab_threshold_padding_and_unknown_policy():
    texts = ["startseq dog runs endseq", "startseq dog sits endseq", "startseq cat runs endseq"]
    vocab = caption_vocab(texts, min_count=2)
    assert vocab.tokens[0] == "" and len(vocab) == 1 + 4  # startseq endseq dog runs, + padding
    assert "cat" not in vocab and "" not in vocab
    assert vocab.encode("startseq cat runs endseq") == [vocab.index(w) for w in ("startseq", "runs", "endseq")]
    with_unk = caption_vocab(texts, min_count=2, unknown="unk")
    assert len(with_unk) == 6 and with_unk.index("unk") == 1
    assert with_unk.encode("cat runs") == [1, with_unk.index("runs")]
    tokens = vocab.encode_batch(texts)
    assert tokens.shape == (3, 4) and tokens.dtype == np.int32
    assert vocab.decode(tokens[0]) == ["dog", "runs"]
    assert Vocab.from_json(json.loads(json.dumps(vocab.to_json()))) == vocab
    # Caption runs saved before the one Vocab ({"words", ...}) still load, with startseq/endseq as markers.
    old = Vocab.from_json({"words": ["", "startseq", "endseq", "dog"], "counts": [0, 3, 3, 2], "unknown": None})
    assert old.start_index == 1 and old.decode([1, 3, 2, 3]) == ["dog"] and old.encode("cat dog") == [3]
    with pytest.raises(ValueError, match="max_len"):
        vocab.encode_batch(texts, max_len=2)


def test_the_chapters_figures_on_the_real_file(shared_data):
    root = shared_data / "flickr8k"
    captions = flickr8k.load_captions(root / flickr8k.TOKEN_FILE)
    assert len(captions) == 8092 and all(len(c) == 5 for c in captions.values())
    assert "2258277193_586949ec62" in captions  # the odd id ...jpg.1
    cleaned = {k: [clean_caption(c) for c in v] for k, v in captions.items()}
    assert len({w for v in cleaned.values() for c in v for w in c.split()}) == 8763
    train_ids = flickr8k.load_split(root / flickr8k.SPLIT_FILES["train"])
    assert len(train_ids) == 6000
    train_texts = [wrap(c) for k in train_ids for c in cleaned[k]]
    assert len(train_texts) == 30000
    assert len(caption_vocab(train_texts, min_count=1)) - 1 == 7578
    vocab = caption_vocab(train_texts, min_count=10)
    assert len(vocab) == 1652  # 1,651 words + padding
    assert max(len(t.split()) for t in train_texts) == 34
    data = flickr8k.load(root)  # the shared copy has 2 images: everything else is listed, not a crash
    assert sorted(i for s in data.splits.values() for i in s) == ["1000268201_693b08cb0e", "1002674143_1b742ab4b8"]
    assert len(data.report.missing_images) == 8000 - 2
    assert data.report.odd_ids == ["2258277193_586949ec62.jpg.1"]


def test_loader_reports_malformed_lines_and_missing_images(tmp_path):
    token = tmp_path / "Flickr8k.token.txt"
    token.write_text("a_1.jpg#0\tA dog runs .\n"
                     "a_1.jpg#1\tA dog is running\n"
                     "broken line without tab or number\n"
                     "\n"
                     "b_2.jpg.1#0\tA cat .\n"
                     "c_3.jpg#0\t\n"
                     "d_4.jpg#0\tA bird .\n")
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("a_1.jpg\nb_2.jpg\nz_9.jpg\n")
    (tmp_path / "Flickr_8k.devImages.txt").write_text("d_4.jpg\nnot an image name\n")
    (tmp_path / "Flickr_8k.testImages.txt").write_text("e_5.jpg\n")  # an empty list raises (tested below)
    (tmp_path / "images").mkdir()
    for name in ("a_1.jpg", "b_2.jpg"):
        (tmp_path / "images" / name).write_bytes(b"")
    with pytest.warns(UserWarning, match=r"line 3.*line 6"):
        captions = flickr8k.load_captions(token)
    assert captions == {"a_1": ["A dog runs .", "A dog is running"], "b_2": ["A cat ."], "d_4": ["A bird ."]}
    with pytest.raises(ValueError, match="line 3"):
        flickr8k.load_captions(token, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # load lists skipped lines in its report, once, and does not warn too
        data = flickr8k.load(tmp_path)
    assert sorted(data.splits["train"]) == ["a_1", "b_2"]
    assert data.report.split_without_captions["train"] == ["z_9"]
    assert data.report.missing_images == ["d_4"]  # captioned, in dev, but no image file
    assert [n for _, n, _, _ in data.report.malformed] == [3, 6, 2]
    assert any("without captions" in line for line in data.report.lines())


def test_glove_matrix_unknown_words_are_zero(shared_data, tmp_path):
    path = shared_data / "glove" / "glove.6B.50d.top2445.txt"
    vocab = caption_vocab(["startseq the man of xqzzy endseq"])
    matrix, found = glove.embedding_matrix(path, vocab)
    assert matrix.shape == (len(vocab), 50) and found == 3  # the, man, of
    np.testing.assert_allclose(matrix[vocab.index("the")][:4], [0.418, 0.24968, -0.41242, 0.1217])
    for word in ("", "xqzzy", "startseq", "endseq"):
        assert not matrix[vocab.index(word)].any()
    bad = tmp_path / "bad.txt"
    bad.write_text("a 1 2\nb 1\nc 1 2\n")
    with pytest.raises(ValueError, match="line 2"):
        glove.load_vectors(bad)


def test_vocab_lookups_name_the_word_or_index_and_the_range():
    vocab = caption_vocab(["startseq dog runs endseq"])
    assert vocab.decode([vocab.start_index, vocab.index("dog"), vocab.end_index]) == ["dog"]
    for bad in (99999, -1):
        with pytest.raises(ValueError, match=rf"index {bad} is not in the vocabulary: valid indices are 0\.\.4"):
            vocab.decode([bad])
    with pytest.raises(KeyError, match="word 'zzzz' is not in the vocabulary of 5 entries"):
        vocab.index("zzzz")
    with pytest.raises(ValueError, match="word 'zzzz'"):  # a ValueError too: the CLI reports it in one line
        vocab.index("zzzz")
    with pytest.raises(KeyError, match="the vocabulary has no 'startseq'"):
        caption_vocab(["a b"]).start_index


def test_empty_flickr8k_files_are_named(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=f"token file '{empty}' is empty"):
        flickr8k.load_captions(empty)
    with pytest.raises(ValueError, match=f"split list '{empty}' is empty"):
        flickr8k.load_split(empty)


def test_glove_non_finite_vector_names_file_line_and_word(tmp_path):
    path = tmp_path / "glove_nan.txt"
    path.write_text("the 1 2\ndog nan 2\ncat 3 4\n")
    with pytest.raises(ValueError, match=rf"{path} line 2: the vector of 'dog' holds a non-finite value"):
        glove.embedding_matrix(path, caption_vocab(["startseq the dog endseq"]))
    path.write_text("the 1 2\ndog 1 x\n")
    with pytest.raises(ValueError, match=rf"{path} line 2: the vector of 'dog' holds a field that is not a number"):
        glove.load_vectors(path)


# --- model ------------------------------------------------------------------------------------------------------

def test_merge_model_has_the_chapters_parameter_count(key):
    model = cap.CaptionModel(cap.CaptionConfig(vocab_size=1652))
    shapes = jax.eval_shape(lambda k: cap.init_params(model, k, (2048,)), key)
    assert cap.count_params(shapes) == {"embedding": 330_400, "image_dense": 524_544, "lstm": 467_968,
                                        "decoder": 65_792, "output": 424_564, "total": 1_813_268}


def _small(variant="merge", vocab=12, **kw):
    return cap.CaptionModel(cap.CaptionConfig(vocab_size=vocab, embed_dim=8, hidden=16, variant=variant,
                                              attention_dim=8, **kw))


def _batch(rng, n=5, length=9, vocab=12, feature_shape=(6,)):
    tokens = np.zeros((n, length), np.int32)
    for row in tokens:
        k = rng.integers(3, length + 1)
        row[:k] = np.r_[1, rng.integers(3, vocab, size=k - 2), 2]
    return {"features": rng.normal(size=(n, *feature_shape)).astype(np.float32), "tokens": tokens}


def test_teacher_forcing_equals_the_chapters_prefix_objective(key):
    """One pass over whole captions = the chapter's (left-padded prefix -> next word) samples, same params."""
    model = _small()
    params = cap.init_params(model, key, (6,))
    batch = _batch(np.random.default_rng(0))
    xs, prefixes, one_hot = cap.seed_prefix_batch(batch["features"], batch["tokens"], 12, max_len=34)
    assert len(prefixes) == int((batch["tokens"][:, 1:] != 0).sum())
    ours = jax.jit(jax.value_and_grad(lambda p: cap.caption_loss(model, p, batch, None)[0]))(params)
    seed = jax.jit(jax.value_and_grad(lambda p: cap.seed_loss(model, p, xs, prefixes, one_hot)))(params)
    np.testing.assert_allclose(ours[0], seed[0], rtol=1e-5)
    assert_trees_close(ours[1], seed[1], rtol=1e-4, atol=1e-6)  # float32 sums in a different order


def test_loss_ignores_padding_and_dropout_needs_a_key(key):
    model = _small()
    params = cap.init_params(model, key, (6,))
    batch = _batch(np.random.default_rng(1))
    longer = {**batch, "tokens": np.pad(batch["tokens"], ((0, 0), (0, 5)))}
    loss = jax.jit(lambda b, k: cap.caption_loss(model, params, b, k)[0])
    deterministic = jax.jit(lambda b: cap.caption_loss(model, params, b, None)[0])
    np.testing.assert_allclose(deterministic(batch), deterministic(longer), rtol=1e-6)
    assert float(loss(batch, jax.random.PRNGKey(1))) != float(loss(batch, jax.random.PRNGKey(2)))


def test_frozen_embedding_gets_no_gradient(key):
    model = _small(freeze_embedding=True)
    matrix = np.random.default_rng(0).normal(size=(12, 8)).astype(np.float32)
    params = cap.init_params(model, key, (6,), embedding_matrix=matrix)
    np.testing.assert_array_equal(params["embedding"]["embedding"], matrix)
    batch = _batch(np.random.default_rng(2))
    grad = jax.jit(jax.grad(lambda p: cap.caption_loss(model, p, batch, key)[0]))(params)
    assert not np.asarray(grad["embedding"]["embedding"]).any()
    assert np.asarray(grad["lstm"]["U"]).any()
    with pytest.raises(ValueError, match="embedding_matrix"):
        cap.init_params(model, key, (6,), embedding_matrix=matrix[:5])


@pytest.mark.parametrize("variant,feature_shape", [("merge", (6,)), ("inject", (6,)), ("attention", (4, 6))])
def test_stepping_the_carried_state_reproduces_teacher_forcing(key, variant, feature_shape):
    model = _small(variant)
    params = cap.init_params(model, key, feature_shape)
    batch = _batch(np.random.default_rng(3), feature_shape=feature_shape)
    logits = jax.jit(model.apply)({"params": params}, batch["features"], batch["tokens"])
    state = model.apply({"params": params}, batch["features"], method=cap.CaptionModel.init_state)
    step = jax.jit(lambda s, tok: model.apply({"params": params}, s, tok, method=cap.CaptionModel.step))
    for t in range(batch["tokens"].shape[1]):
        step_logits, state = step(state, batch["tokens"][:, t])
        np.testing.assert_allclose(step_logits, logits[:, t], rtol=1e-5, atol=1e-5)


def test_attention_weights_are_a_distribution_over_the_grid(key):
    model = _small("attention")
    params = cap.init_params(model, key, (4, 6))
    batch = _batch(np.random.default_rng(4), feature_shape=(4, 6))
    weights = model.apply({"params": params}, batch["features"], batch["tokens"][:, :3],
                          method=cap.CaptionModel.attention_weights)
    assert weights.shape == (5, 3, 4)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="grid features"):
        cap.init_params(model, key, (6,))


def test_greedy_decoding_equals_the_chapters_rerun_the_prefix_loop(key):
    model = _small()
    params = cap.init_params(model, key, (6,))
    features = np.random.default_rng(5).normal(size=(4, 6)).astype(np.float32) * 3
    tokens, lengths = cap.generate(model, params, features, start=1, end=2, max_len=8)
    prefix_logits = jax.jit(lambda f, p: model.apply({"params": params}, f, p,
                                                      method=cap.CaptionModel.seed_prefix_logits))
    for b in range(4):  # the chapter's greedySearch: re-run the model on the padded prefix for every word
        seq = [1]
        for _ in range(8):
            padded = np.zeros((1, 34), np.int32)
            padded[0, -len(seq):] = seq
            logits = np.array(prefix_logits(features[b:b + 1], padded))[0]
            logits[0] = -np.inf
            seq.append(int(np.argmax(logits)))
            if seq[-1] == 2:
                break
        np.testing.assert_array_equal(tokens[b, :len(seq) - 1], seq[1:])
        assert int(lengths[b]) == len(seq) - 1


def test_beam_search_captions_score_at_least_greedy(key):
    model = _small()
    params = cap.init_params(model, key, (6,))
    features = np.random.default_rng(6).normal(size=(6, 6)).astype(np.float32)
    g, _ = cap.generate(model, params, features, start=1, end=2, max_len=6)
    b, _ = cap.generate(model, params, features, start=1, end=2, max_len=6, method="beam", beam_size=4,
                        length_penalty=0.0)

    def logp(seqs):
        full = jnp.concatenate([jnp.ones((6, 1), jnp.int32), jnp.asarray(seqs)], axis=1)
        out = jax.nn.log_softmax(jax.jit(model.apply)({"params": params}, features, full[:, :-1]).at[..., 0]
                                 .set(-jnp.inf))
        picked = jnp.take_along_axis(out, full[:, 1:, None], axis=-1)[..., 0]
        return np.asarray(jnp.where(full[:, 1:] != 0, picked, 0.0).sum(1))

    assert np.all(logp(b) >= logp(g) - 1e-4)


# --- synthetic data, metrics, command line ------------------------------------------------------------------------

def test_synthetic_set_is_deterministic_varied_and_held_out():
    train = sc.make(40, seed=0)
    again = sc.make(40, seed=0)
    test = sc.make(40, seed=0, split="test")
    np.testing.assert_array_equal(train.features, again.features)
    assert train.features.shape == (40, sc.FEATURE_SIZE ** 2 * 3)
    assert not np.allclose(train.features[:5], test.features[:5])
    assert all(len(set(c)) == 5 for c in train.captions)
    assert len({(s.shape, s.colour) for s in train.scenes}) > 8
    assert sc.grid_features(train.features).shape == (40, sc.GRID ** 2, (sc.FEATURE_SIZE // sc.GRID) ** 2 * 3)
    truth = [c[0] for c in train.captions]
    assert sc.attribute_accuracy(truth, train.scenes)["all"] == 1.0
    wrong = [c.replace("red", "green") if "red" in c else c.replace("green", "red") for c in truth]
    assert sc.attribute_accuracy(wrong, train.scenes)["colour"] < 1.0


def test_caption_bleu_uses_all_references():
    refs = [["a dog runs on grass", "dog running"], ["two children play in the water", "kids swim"]]
    perfect = metrics.caption_bleu(["dog running", "kids swim"], refs)
    assert perfect["bleu1"] == pytest.approx(100.0) and perfect["bleu4"] <= 100.0
    mixed = metrics.caption_bleu(["a dog runs on grass", "two children play in the water"], refs)
    assert mixed["bleu4"] == pytest.approx(100.0)
    assert metrics.caption_bleu(["a cat", "a cat"], refs)["bleu1"] < 50
    with pytest.raises(ValueError, match="reference"):
        metrics.caption_bleu(["x"], refs)


def test_cider_and_rouge_l_against_hand_values():
    import_or_skip("pycocoevalcap")
    refs = [["a dog runs on grass"], ["two children play in the water"], ["a red bird sits on a branch"]]
    perfect = metrics.caption_cider_rouge([r[0] for r in refs], refs)
    # CIDEr-D of a caption equal to its only reference: cosine 1 for n = 1..4, no length penalty, x10.
    assert perfect["cider"] == pytest.approx(10.0, rel=1e-6) and perfect["rouge_l"] == pytest.approx(1.0)
    # ROUGE-L of "dog runs on grass" against "dog on grass fast": LCS 3, P = R = 3/4, so F_beta = 3/4.
    one = metrics.caption_cider_rouge(["dog runs on grass"], [["dog on grass fast"]])
    assert one["rouge_l"] == pytest.approx(0.75)
    worse = metrics.caption_cider_rouge(["a dog", "two children", "a bird"], refs)
    assert 0 < worse["cider"] < perfect["cider"] and 0 < worse["rouge_l"] < 1
    with pytest.raises(ValueError, match="hypotheses"):
        metrics.caption_cider_rouge(["x"], refs)


def test_caption_cli_train_eval_predict(tmp_path, capsys):
    from jaxseq import cli

    out = tmp_path / "run"
    code = cli.main(["caption", "train", "--epochs", "1", "--out", str(out), "--synthetic-images", "64",
                     "--batch-size", "32", "--embed-dim", "8", "--hidden", "16", "--beam", "1", "--no-progress"])
    assert code == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["images"] == 64 and set(report["greedy"]) >= {"bleu1", "bleu4", "attributes"}
    assert 0 <= report["greedy"]["bleu4"] <= 100
    assert (out / "loss.png").is_file() and (out / "test_captions.txt").is_file()
    image = tmp_path / "shape.png"
    sc.draw(sc.Scene("circle", "red", "large", "top", "left"), np.random.default_rng(0)).save(image)
    capsys.readouterr()
    assert cli.main(["caption", "predict", "--run", str(out), str(image)]) == 0
    line = capsys.readouterr().out
    assert line.startswith(str(image) + "\t") and line.count("\n") == 1
    assert cli.main(["caption", "eval", "--run", str(out), "--split", "dev"]) == 0
    assert json.loads(capsys.readouterr().out)["split"] == "dev"
    assert cli.main(["caption", "predict", "--run", str(tmp_path / "nothing"), str(image)]) == 2
    assert cli.main(["caption", "train", "--data", str(tmp_path), "--epochs", "1", "--out", str(out)]) == 2
