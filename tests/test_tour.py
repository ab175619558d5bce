"""`jaxseq tour --quick` end to end: every topic runs on embedded data and the report has every section."""
import re

from jaxseq import cli, tour
from jaxseq.commands import tour as tour_command


def test_quick_tour_writes_every_section(tmp_path, capsys):
    code = cli.main(["tour", "--quick", "--out", str(tmp_path / "tour")])
    report = (tmp_path / "tour" / "README.md").read_text()
    output = capsys.readouterr().out
    sections = report.split("\n## ")[1:]
    assert len(sections) == len(tour.SECTIONS)
    for number, ((slug, title, _), text) in enumerate(zip(tour.SECTIONS, sections), 1):
        assert text.startswith(f"{number}. {title}")
        assert f"{slug:<10} ok" in output, output
        # Progress: a line as each section starts and as it ends, with its time.
        assert f"[{number}/{len(tour.SECTIONS)}] {title}: started" in output, output
        assert re.search(rf"\[{number}/{len(tour.SECTIONS)}\] {re.escape(title)}: ok in \d+ s", output), output
        assert re.search(r"Reproduce[^:]*: `jaxseq \S+", text), f"section {number} names no jaxseq command:\n{text}"
    assert "**Failed**" not in report
    assert code == 0
    # Inside the sections: a line per model, and why the first steps are slow.
    assert "    LSTM: test accuracy" in output and "    additive attention: dev sacreBLEU" in output, output
    assert "compiling the training step for batch shape" in output, output
    # No raw Python values, no references to a book's chapter numbers, no empty folders.
    assert "None" not in report and not re.search(r"chapter \d+", report, re.IGNORECASE)
    assert not [p for p in (tmp_path / "tour").rglob("*") if p.is_dir() and not any(p.iterdir())]
    # Section 1 labels each row with what it measures.
    assert "| LSTM, forget bias 1 | ‖∂c_T/∂c_t‖₂ (cell path) |" in report
    # Figures the report links to exist.
    for image in ("gradients/rnn/gradnorms.png", "forecast/forecast.png", "translate/attention.png"):
        assert (tmp_path / "tour" / image).is_file(), image
    assert "| persistence |" in report and "| additive |" in report


def test_tour_only_runs_the_named_sections_and_knows_every_section(tmp_path, capsys):
    assert tour_command.SECTIONS == tuple(slug for slug, _, _ in tour.SECTIONS)
    assert cli.main(["tour", "--quick", "--only", "gradients", "--out", str(tmp_path / "t")]) == 0
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["README.md", "gradients"]
    assert "## 1. Gradient norms against theory" in (tmp_path / "t" / "README.md").read_text()
    capsys.readouterr()


def test_speed_section_runs_from_an_installed_package(tmp_path):
    """Only the package, as pip installs it: no benchmarks/ beside it, so the section must time in-process."""
    import os
    import pathlib
    import shutil
    import subprocess
    import sys

    site = tmp_path / "site"
    shutil.copytree(pathlib.Path(tour.__file__).parent, site / "jaxseq", ignore=shutil.ignore_patterns("__pycache__"))
    script = ("import pathlib, sys\nfrom jaxseq import tour\nprint(tour.__file__)\n"
              "cfg = tour.TourConfig.quick(pathlib.Path(sys.argv[1]))\ncfg.out.mkdir()\nprint(tour.speed(cfg, cfg.out))")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(str(site / "jaxseq")), done.stdout
    assert '| jaxseq impl="scan" |' in done.stdout and "Peers installed:" in done.stdout


# --- the figures the tour writes ---------------------------------------------------------------------------------

def _drawn(monkeypatch, draw):
    """The matplotlib figure ``draw()`` saves (kept open to be inspected)."""
    from jaxseq import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or path)
    draw()
    assert len(figures) == 1
    return figures[0]


def test_loss_curve_draws_a_score_on_its_own_axis_and_titles_the_run(tmp_path, monkeypatch):
    from jaxseq import plots

    fig = _drawn(monkeypatch, lambda: plots.loss_curve(
        [1, 2, 3], [5.0, 1.0, 0.2], tmp_path / "caption-run" / "loss.png", eval_steps=[3], eval_values=[42.0],
        eval_label="eval dev_bleu4"))
    loss_axis, score_axis = fig.axes
    assert loss_axis.get_ylabel() == "loss" and loss_axis.get_yscale() == "log"  # spans 25x
    assert score_axis.get_ylabel() == "dev_bleu4" and score_axis.get_yscale() == "linear"
    assert "caption-run" in loss_axis.get_title()


def test_loss_curve_is_linear_over_a_narrow_range_and_keeps_an_eval_loss_on_its_axis(tmp_path, monkeypatch):
    from jaxseq import plots

    fig = _drawn(monkeypatch, lambda: plots.loss_curve(
        [1, 2, 3], [1.795, 1.79, 1.781], tmp_path / "bag" / "loss.png", eval_steps=[3], eval_values=[1.785],
        eval_label="eval dev_loss"))
    (axis,) = fig.axes
    assert axis.get_yscale() == "linear"
    assert [line.get_label() for line in axis.get_lines()] == ["train loss", "eval dev_loss"]


def test_attention_map_labels_its_colour_bar(tmp_path, monkeypatch):
    import numpy as np

    from jaxseq import plots

    fig = _drawn(monkeypatch, lambda: plots.attention_map(np.full((2, 3), 1 / 3), ["I", "love", "it"],
                                                          ["a", "</s>"], tmp_path / "attention.png"))
    assert fig.axes[1].get_ylabel() == "attention weight"


def test_gradient_norm_figure_writes_formulas_as_mathtext(tmp_path, monkeypatch):
    import jax

    from jaxseq import gradients, plots

    with jax.enable_x64(True):
        result = gradients.profile("lstm", steps=3, hidden=4, sigma=0.9)
    fig = _drawn(monkeypatch, lambda: plots.plot_profile(result, tmp_path / "gradnorms.png"))
    labels = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert labels[0] == r"measured $\|\partial c_T/\partial c_t\|_2$", labels
    assert all("||" not in label and "prod" not in label for label in labels), labels
    assert r"$\sigma_{\max}$" in fig.axes[0].get_title()


# --- progress ----------------------------------------------------------------------------------------------------

def test_fit_says_it_is_compiling_before_each_new_batch_shape(tmp_path, caplog):
    """Bucketed data compiles the step once per shape: a line before each, counted against the source's shapes."""
    import logging

    import jax.numpy as jnp
    import numpy as np

    from jaxseq.training import TrainConfig, fit

    class TwoShapes:
        batch_size = 2

        def shapes(self):
            return [(3,), (5,)]

        def num_batches(self, epoch):
            return 4

        def batch(self, epoch, index):
            return {"x": np.ones((2, 3 if index % 2 == 0 else 5), np.float32)}

    def loss_fn(params, batch, key):
        loss = jnp.mean((batch["x"] * params["w"]) ** 2)
        return loss, {}

    with caplog.at_level(logging.INFO, logger="jaxseq.training.compile"):
        fit(TrainConfig(out_dir=str(tmp_path / "run"), epochs=1, batch_size=2, progress=False),
            init_params=lambda key: {"w": jnp.ones(())}, loss_fn=loss_fn, train=TwoShapes())
    lines = [r.getMessage() for r in caplog.records if r.name == "jaxseq.training.compile"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("compiling the training step for batch shape 1 of 2 (x [2, 3])"), lines
    assert "2 of 2 (x [2, 5])" in lines[1], lines
