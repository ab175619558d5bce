"""Many-to-one classifier: the order data set needs order, pooling respects lengths, and training learns it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseq import cells
from jaxseq.models import classifier
from jaxseq.tasks import classify, forecast


def test_order_dataset_classes_differ_only_in_order():
    data = classify.make_order_dataset(200, num_steps=10, num_features=4, noise=0.0, seed=1)
    assert data["xs"].shape == (200, 10, 4) and set(np.unique(data["labels"])) <= set(range(6))
    assert (data["lengths"] >= 5).all() and (data["lengths"] <= 10).all()
    # Without noise, the sum of frames (what a bag of frames sees) is the same for every sequence.
    sums = data["xs"].sum(axis=1)
    np.testing.assert_allclose(sums, np.broadcast_to(sums[0], sums.shape), atol=1e-5)
    for n in range(5):  # padded frames are zero
        assert not data["xs"][n, data["lengths"][n]:].any()
    with pytest.raises(ValueError, match="num_steps must be at least 6"):
        classify.make_order_dataset(3, num_steps=4)


@pytest.mark.parametrize("pooling", classifier.POOLINGS)
def test_pooling_ignores_padding(pooling, key):
    model = classifier.SequenceClassifier(cells.gru, 8, 6, pooling=pooling, bidirectional=True)
    xs = jax.random.normal(key, (2, 7, 3))
    lengths = jnp.array([4, 7])
    params = model.init(key, xs, lengths)["params"]
    garbage = xs.at[0, 4:].set(100.0)  # changing padded frames must not change the logits
    np.testing.assert_allclose(model.apply({"params": params}, xs, lengths),
                               model.apply({"params": params}, garbage, lengths), atol=1e-5)
    with pytest.raises(ValueError, match="pooling must be one of"):
        classifier.SequenceClassifier(cells.gru, 8, 6, pooling="median").init(key, xs, lengths)


def test_lstm_learns_order_where_bag_of_frames_cannot(tmp_path):
    results = classify.compare(tmp_path, models=("bag", "lstm"), num_train=1000, num_test=300, num_steps=10,
                               hidden_size=24, epochs=6, progress=False)
    assert results["bag"] < 0.3  # chance is 1/6
    assert results["lstm"] > 0.8
    # The saved run predicts what the trained one scored.
    run = classify.load_run(tmp_path / "lstm")
    test = classify.make_order_dataset(300, num_steps=10, seed=1)
    assert classify.evaluate(run, test) == pytest.approx(results["lstm"])
    with pytest.raises(ValueError, match="holds a classify run .*expected a forecast run"):
        forecast.load_run(tmp_path / "lstm")
