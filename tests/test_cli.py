"""The ``jaxseq`` console script on bad input: one line naming the flag or file, exit 2, never a traceback."""
import json
import pathlib
import re

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



# --- run folders of the wrong kind ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake_runs(tmp_path_factory):
    """Run folders whose checkpoints hold the run config each task writes (enough to tell the kinds apart)."""
    import jax.numpy as jnp

    from jaxseq import training

    root = tmp_path_factory.mktemp("runs")
    configs = {"forecast": {"forecast": {"model": "lstm"}, "scaler": {}},
               "caption": {"task": "caption", "model": {}},
               "translate": {"model": {}, "tokenizer": "regex"}}
    for kind, run_config in configs.items():
        training.fit(training.TrainConfig(out_dir=str(root / kind), epochs=1, batch_size=2, progress=False),
                     init_params=lambda key: {"w": jnp.zeros(1)},
                     loss_fn=lambda p, b, k: ((p["w"] ** 2).sum(), {}),
                     train=training.ArrayBatches({"x": np.zeros((2, 1), np.float32)}, 2, seed=0),
                     run_config=run_config)
    return root


@pytest.mark.parametrize("argv, got, expected", [
    (["forecast", "predict", "--run", "{caption}"], "caption", "forecast"),
    (["forecast", "predict", "--run", "{translate}"], "translate", "forecast"),
    (["caption", "eval", "--run", "{forecast}"], "forecast", "caption"),
    (["caption", "predict", "--run", "{translate}", "image.png"], "translate", "caption"),
    (["translate", "predict", "--run", "{caption}", "hello"], "caption", "translate"),
    (["translate", "eval", "--run", "{forecast}", "--src", "{text}", "--ref", "{text}"], "forecast", "translate"),
])
def test_run_folders_of_another_task_are_named(argv, got, expected, fake_runs, tmp_path, capsys):
    text = tmp_path / "one.txt"
    text.write_text("hello\n")
    argv = [a.format(text=text, **{k: fake_runs / k for k in ("forecast", "caption", "translate")}) for a in argv]
    assert cli.main(argv) == 2
    line = _one_line(capsys)
    assert f"holds a {got} run" in line and f"expected a {expected} run" in line, line


# --- hostile or broken weights ----------------------------------------------------------------------------------

class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _images(folder):
    from PIL import Image

    folder.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(folder / "red.png")
    return folder


def test_caption_features_refuses_evil_and_garbage_weights_in_one_line(tmp_path, capsys):
    import pickle

    from jaxseq.encoders import torch_pickle

    images, marker, evil, garbage = _images(tmp_path / "imgs"), tmp_path / "pwned", tmp_path / "evil.pth", \
        tmp_path / "garbage.pth"
    with open(evil, "wb") as f:
        for header in (torch_pickle.LEGACY_MAGIC_NUMBER, torch_pickle.LEGACY_PROTOCOL_VERSION,
                       {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        pickle.dump({"w": _RunsCode(marker)}, f, protocol=2)
    garbage.write_bytes(b"\x80\x02 these bytes are no pickle" * 8)
    for weights, why in ((evil, "refusing to load global"), (garbage, "not a readable PyTorch weights file")):
        assert cli.main(["caption", "features", "--images", str(images), "--encoder", "efficientnet_lite0",
                         "--weights", str(weights), "--out", str(tmp_path / "f.npz")]) == 2
        line = _one_line(capsys)
        assert line.startswith("jaxseq caption: error: ") and str(weights) in line and why in line, line
    assert not marker.exists()


# --- Flickr8k problems are reported once ------------------------------------------------------------------------

def test_malformed_flickr8k_line_is_reported_once(tmp_path, capsys):
    import warnings

    root = tmp_path / "flickr"
    root.mkdir()
    (root / "Flickr8k.token.txt").write_text("a_1.jpg#0\tA dog runs .\nbroken line without a tab\n"
                                             "b_2.jpg#0\tA cat sits .\nc_3.jpg#0\tA bird flies .\n")
    for split, name in (("train", "a_1"), ("dev", "b_2"), ("test", "c_3")):
        (root / f"Flickr_8k.{split}Images.txt").write_text(f"{name}.jpg\n")
    feats = tmp_path / "f.npz"
    np.savez(feats, ids=np.array(["a_1", "b_2", "c_3"]), features=np.ones((3, 4), np.float32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # --min-count 1000 stops the run right after the data is read.
        assert cli.main(["caption", "train", "--data", str(root), "--features", str(feats), "--min-count", "1000",
                         "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    why = "lacks the '#<n>' caption number"  # the reason, in the warning and in the report alike
    mentions = err.count(why) + sum(why in str(w.message) for w in caught)
    assert mentions == 1, (err, [str(w.message) for w in caught])
    assert "--min-count 1000" in err.splitlines()[-1]


# --- one line for foreseeable errors, tracebacks for bugs and on request -----------------------------------------

def test_missing_optional_package_is_one_line(monkeypatch, capsys):
    from jaxseq.commands import gradnorms

    monkeypatch.setattr(gradnorms, "run", _raising(ImportError("reading Keras weights needs h5py: pip install h5py")))
    assert cli.main(["gradnorms", "--out", "x"]) == 2
    assert _one_line(capsys) == "jaxseq gradnorms: error: reading Keras weights needs h5py: pip install h5py"


def test_bugs_keep_their_traceback(monkeypatch):
    from jaxseq.commands import gradnorms

    monkeypatch.setattr(gradnorms, "run", _raising(KeyError("forecast")))
    with pytest.raises(KeyError):
        cli.main(["gradnorms", "--out", "x"])


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_traceback(how, tmp_path, monkeypatch, capsys):
    argv = ["forecast", "predict", "--run", str(tmp_path / "none")]
    assert cli.main(argv) == 2 and "does not exist" in _one_line(capsys)
    if how == "flag":
        argv = ["--debug", *argv]
    else:
        monkeypatch.setenv("JAXSEQ_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.main(argv)


def test_caption_run_with_a_broken_vocabulary_names_the_file(fake_runs, tmp_path, capsys):
    import shutil

    run = tmp_path / "caption"
    shutil.copytree(fake_runs / "caption", run)
    assert cli.main(["caption", "eval", "--run", str(run)]) == 2
    assert f"run folder '{run}' has no vocab.json" in _one_line(capsys)
    (run / "vocab.json").write_text("{not json")
    assert cli.main(["caption", "eval", "--run", str(run)]) == 2
    assert f"{run / 'vocab.json'} is not a saved vocabulary" in _one_line(capsys)


# --- help ------------------------------------------------------------------------------------------------------

def _options(parser):
    return [action for action in parser._actions if action.option_strings and action.option_strings != ["-h", "--help"]]


def test_every_option_has_help_and_shows_its_default():
    missing, no_default = [], []
    for parser in cli.parsers(cli.build_parser()):
        for action in _options(parser):
            name = f"{parser.prog} {action.option_strings[-1]}"
            if not (action.help or "").strip():
                missing.append(name)
            elif (commands.worth_showing(action.default)
                  and "default" not in parser.formatter_class(parser.prog)._get_help_string(action)):
                no_default.append(name)
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"options whose help hides the default: {no_default}"


def test_help_is_plain_text(capsys):
    """Sub-command descriptions are module docstrings in reST: the terminal gets them without its markup."""
    for parser in cli.parsers(cli.build_parser()):
        text = parser.format_help()
        assert "``" not in text and "::" not in text, f"{parser.prog} --help shows reST:\n{text}"
        assert not re.search(r"\bchapter \d+", text, re.IGNORECASE), f"{parser.prog} --help cites a chapter number"
    capsys.readouterr()


def _command_lines(text: str) -> list[str]:
    """The `jaxseq ...` command lines of ``text``: continuation lines joined, comments and spacing dropped."""
    text = text.replace("\\\n", " ")
    lines = (line.split("#")[0].strip() for line in text.splitlines())
    return [" ".join(line.split()) for line in lines if line.startswith("jaxseq ")]


def test_help_examples_agree_with_the_readme():
    """An example in the help that trains into the same folder as one in README.md is that command."""
    readme = _command_lines((pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text())
    checked = 0
    for parser in cli.parsers(cli.build_parser()):
        for example in _command_lines(parser.description or ""):
            out = re.search(r"--(?:out|run) (\S+)", example)
            same = [line for line in readme if out and line.split()[:3] == example.split()[:3]
                    and re.search(rf"--(?:out|run) {re.escape(out[1])}(\s|$)", line)]
            for line in same:
                assert example == line, f"{parser.prog} --help says\n  {example}\nREADME.md says\n  {line}"
                checked += 1
    assert checked >= 4  # caption train/predict and translate train/predict at least
