"""The ``jaxseq`` console script on bad input: one line naming the flag or file, exit 2, never a traceback."""
import json

import numpy as np
import pytest

from jaxseq import cli, commands


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


@pytest.mark.parametrize("argv, flag", [
    (["forecast", "train", "--epochs", "1", "--hidden", "0"], "--hidden"),
    (["forecast", "train", "--epochs", "1", "--hidden", "-3"], "--hidden"),
    (["forecast", "train", "--epochs", "1", "--layers", "0"], "--layers"),
    (["forecast", "train", "--lookback", "0"], "--lookback"),
    (["forecast", "train", "--batch-size", "0"], "--batch-size"),
    (["forecast", "predict", "--run", "x", "--steps", "0"], "--steps"),
    (["caption", "train", "--out", "x", "--epochs", "1", "--hidden", "0"], "--hidden"),
    (["caption", "train", "--out", "x", "--epochs", "1", "--embed-dim", "0"], "--embed-dim"),
    (["caption", "train", "--out", "x", "--min-count", "0"], "--min-count"),
    (["caption", "predict", "--run", "x", "img.png", "--beam", "0"], "--beam"),
    (["translate", "eval", "--run", "x", "--src", "a", "--ref", "b", "--beam", "-1"], "--beam"),
])
def test_sizes_must_be_positive(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert f"argument {flag}: must be a positive integer (>= 1)" in _one_line(capsys)


@pytest.mark.parametrize("argv, flag", [
    (["forecast", "train", "--lr", "nan"], "--lr"),
    (["forecast", "train", "--dropout", "inf"], "--dropout"),
    (["caption", "eval", "--run", "x", "--length-penalty", "nan"], "--length-penalty"),
])
def test_floats_must_be_finite(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert f"argument {flag}: must be a finite number" in _one_line(capsys)


def test_library_checks_sizes_too():
    from jaxseq.models import captioning as cap
    from jaxseq.models import forecasting as fc
    from jaxseq.tasks import forecast

    with pytest.raises(ValueError, match="hidden_size must be a positive integer, got 0"):
        forecast.ForecastConfig(hidden_size=0)
    with pytest.raises(ValueError, match="num_layers must be a positive integer, got 0"):
        fc.make_model("lstm", num_layers=0)
    with pytest.raises(ValueError, match="CaptionConfig.embed_dim must be a positive integer, got 0"):
        cap.CaptionConfig(vocab_size=10, embed_dim=0)


def test_translate_help_lists_every_action(capsys):
    with pytest.raises(SystemExit):
        cli.main(["translate", "--help"])
    assert "{train,eval,predict,compare}" in capsys.readouterr().out


def _raising(error):
    def run(args):
        raise error
    return run


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    from jaxseq.commands import gradnorms

    monkeypatch.setattr(gradnorms, "run", _raising(KeyboardInterrupt()))
    assert cli.main(["gradnorms", "--out", "x"]) == 130
    assert _one_line(capsys) == "jaxseq gradnorms: interrupted"


def test_os_errors_name_the_path(monkeypatch, capsys):
    from jaxseq.commands import gradnorms

    monkeypatch.setattr(gradnorms, "run", _raising(IsADirectoryError(21, "Is a directory", "/some/dir")))
    assert cli.main(["gradnorms", "--out", "x"]) == 2
    assert _one_line(capsys) == "jaxseq gradnorms: error: /some/dir: is a directory"


def test_library_words_become_flags():
    message = str(commands.reword(ValueError("checkpoint c (step 6) was written with different TrainConfig fields: "
                                             "lr. Use a new out_dir, or restart=True to overwrite it.")))
    assert message.endswith("Use a new --out folder, or --restart to overwrite it.")
    message = str(commands.reword(ValueError("7 examples make no full batch of batch_size=8; lower batch_size or "
                                             "pass drop_remainder=False")))
    assert message == "7 examples make no full batch of --batch-size 8; lower --batch-size"


def test_forecast_batch_larger_than_the_data_names_the_flag(tmp_path, capsys):
    dates = np.datetime64("2020-01-01") + np.arange(40)
    csv = tmp_path / "s.csv"
    csv.write_text("Date,Close\n" + "".join(f"{d},{100 + np.sin(i):.4f}\n" for i, d in enumerate(dates)))
    argv = ["forecast", "train", "--csv", str(csv), "--lookback", "5", "--batch-size", "500", "--epochs", "1",
            "--out", str(tmp_path / "run"), "--no-progress"]
    assert cli.main(argv) == 2
    line = _one_line(capsys)
    assert "--batch-size 500 is larger than the" in line and "training windows" in line
    assert "drop_remainder" not in line


def test_forecast_non_positive_value_names_the_file_line(tmp_path, capsys):
    dates = np.datetime64("2020-01-01") + np.arange(40)
    values = 100 + np.arange(40.0)
    values[7] = -5  # data row 8 is file line 9 (line 1 is the header)
    csv = tmp_path / "neg.csv"
    csv.write_text("Date,Close\n" + "".join(f"{d},{v}\n" for d, v in zip(dates, values)))
    assert cli.main(["forecast", "train", "--csv", str(csv), "--lookback", "5", "--epochs", "1",
                     "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert f"{csv}: line 9, column 'Close': value -5 is not positive" in _one_line(capsys)


# --- translate --------------------------------------------------------------------------------------------------

def test_translate_eval_names_an_empty_file_and_a_folder_hyp_out(tmp_path, capsys):
    empty, text = tmp_path / "empty.en", tmp_path / "one.vi"
    empty.write_text("")
    text.write_text("xin chào\n")
    assert cli.main(["translate", "eval", "--run", str(tmp_path), "--src", str(empty), "--ref", str(text)]) == 2
    assert f"--src {empty} is empty" in _one_line(capsys)
    assert cli.main(["translate", "eval", "--run", str(tmp_path), "--src", str(text), "--ref", str(empty)]) == 2
    assert f"--ref {empty} is empty" in _one_line(capsys)
    assert cli.main(["translate", "eval", "--run", str(tmp_path), "--src", str(text), "--ref", str(text),
                     "--hyp-out", str(tmp_path)]) == 2
    assert f"--hyp-out {tmp_path} is a folder" in _one_line(capsys)


def test_translate_compare_rejects_other_runs_and_bad_json(tmp_path, capsys):
    caption_run, broken = tmp_path / "caption", tmp_path / "broken"
    caption_run.mkdir()
    broken.mkdir()
    (caption_run / "metrics.json").write_text(json.dumps({"greedy": {}, "images": 3}))
    (broken / "metrics.json").write_text("{\n")
    assert cli.main(["translate", "compare", str(caption_run)]) == 2
    assert f"{caption_run} is not a translation run (its metrics.json" in _one_line(capsys)
    assert cli.main(["translate", "compare", str(broken)]) == 2
    assert f"{broken / 'metrics.json'} is not valid JSON" in _one_line(capsys)


# --- caption ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"not an image"])
def test_caption_predict_names_an_unreadable_image(tmp_path, content):
    from jaxseq.tasks import caption

    bad = tmp_path / "text.png"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=f"image '{bad}' cannot be read as an image"):
        caption.image_features([str(bad)], {"data": {"kind": "synthetic"}})


def test_caption_train_says_min_count_emptied_the_vocabulary(tmp_path, capsys):
    argv = ["caption", "train", "--epochs", "1", "--min-count", "1000", "--synthetic-images", "4",
            "--out", str(tmp_path / "run"), "--no-progress"]
    assert cli.main(argv) == 2
    line = _one_line(capsys)
    assert "--min-count 1000" in line and "every caption became empty" in line


def test_caption_features_npz_nan_and_garbage(tmp_path):
    from jaxseq.tasks import caption

    feats = np.ones((3, 4), np.float32)
    feats[1, 2] = np.nan
    path = tmp_path / "f.npz"
    np.savez(path, ids=np.array(["a.jpg", "b.jpg", "c.jpg"]), features=feats)
    with pytest.raises(ValueError, match=r"non-finite .* for 1 image\(s\): b"):
        caption.load_npz_features(path)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive at all" * 4)
    with pytest.raises(ValueError, match=f"features file '{garbage}' is not a readable .npz"):
        caption.load_npz_features(garbage)
    one_array = tmp_path / "one.npz"
    with open(one_array, "wb") as f:
        np.save(f, feats)
    with pytest.raises(ValueError, match=f"features file '{one_array}' is not a readable .npz"):
        caption.load_npz_features(one_array)

