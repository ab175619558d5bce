"""The tour: every topic end to end on embedded data, one report folder (``jaxseq tour``).

Sections (each in its own sub-folder of ``out``, collected in ``out/README.md``):

1. gradient norms against theory (linear, tanh RNN, LSTM) — ``jaxseq.gradients.profile`` (``jaxseq gradnorms``)
2. learning a long dependency: the adding problem, LSTM against a tanh RNN
3. many-to-one classification where only the order of events matters — ``jaxseq.tasks.classify``
4. Bitcoin forecast against persistence, drift and linear AR — ``jaxseq.tasks.forecast``
5. captioning the synthetic picture set, greedy and beam — ``jaxseq.tasks.caption``
6. English→Vietnamese on Tatoeba: the plain seq2seq against additive attention, an attention map —
   ``jaxseq.tasks.translate``
7. the LSTM layer's speed: the default layer against ``impl="scan"`` and PyTorch's ``nn.LSTM`` when installed,
   timed in this process (no source checkout needed; ``benchmarks/bench_lstm.py`` is the full comparison)

Every section calls the same task functions the command line calls, formats what they return and names the
command that reproduces it with the section's settings (``jaxseq tour --only SECTION`` where no other command
does); a section that fails is reported as such and the tour goes on, so one broken piece does not lose the
rest. ``quick=True`` shrinks every section so the whole tour runs in about 90 s on 2 CPU cores (the test suite
runs it). Progress goes to ``logging.getLogger("jaxseq.tour")``: a line as each section starts and ends, one per
model inside the sections that train several, one per epoch inside those that train one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import time
import traceback
from typing import Callable

log = logging.getLogger("jaxseq.tour")


@dataclasses.dataclass(frozen=True)
class TourConfig:
    """Sizes of each section; ``quick()`` gives the CI-sized tour."""

    out: pathlib.Path
    seed: int = 0
    quick_sizes: bool = False  # built by ``quick()``: the CI-sized tour (``jaxseq tour --quick``)
    gradnorm_steps: int = 100  # T of the gradient-norm profiles
    adding_steps: int = 50  # sequence length of the adding problem
    adding_train_steps: int = 1500  # optimisation steps per cell on the adding problem
    classify_train: int = 2000  # order-classification training sequences
    classify_epochs: int = 10
    forecast_epochs: int = 10
    caption_epochs: int = 6
    caption_images: int = 1200
    # The command line's translation defaults (about 80 s per model on 2 idle CPU cores): the plain seq2seq and the
    # default score function; docs/translation.md compares all six scores at the same settings.
    translate_epochs: int = 16
    translate_max_len: int = 10  # Tatoeba pairs up to this many tokens
    translate_bucket_widths: tuple | None = None  # None: the command line's length buckets
    attention: tuple = ("none", "additive")
    speed_shape: tuple = (1, 100, 128, 256)  # batch, time, input, hidden of the timed LSTM layer
    speed_repeats: int = 5  # interleaved samples per implementation and mode; the median is reported

    @classmethod
    def quick(cls, out, seed: int = 0) -> "TourConfig":
        # Every section at its smallest (the test suite runs this): the time is mostly compilation, so one
        # translation model and one timing repeat instead of more steps.
        return cls(out=pathlib.Path(out), seed=seed, quick_sizes=True, gradnorm_steps=30, adding_steps=20,
                   adding_train_steps=60, classify_train=256, classify_epochs=1, forecast_epochs=1, caption_epochs=1,
                   caption_images=96, translate_epochs=1, translate_max_len=4, translate_bucket_widths=(5,),
                   attention=("additive",),
                   speed_shape=(1, 20, 16, 32), speed_repeats=1)


def _train_config(folder: pathlib.Path, cfg: TourConfig, epochs: int, **fields):
    """The command line's ``TrainConfig`` for a section: absolute folder, no progress bar."""
    from jaxseq.training import TrainConfig

    return TrainConfig(out_dir=str(folder.resolve()), seed=cfg.seed, epochs=epochs, progress=False, **fields)


class _Indent(logging.Filter):
    """Indents a library line under the section that runs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = "    " + str(record.msg)
        return True


@contextlib.contextmanager
def _quiet_library():
    """Only warnings from the tasks and the training loop while the tour runs (its report is the output), and the
    loop's line before each compilation, which says why a section's first steps are slow."""
    levels = {"jaxseq.tasks": logging.WARNING, "jaxseq.training": logging.WARNING,
              "jaxseq.training.compile": logging.INFO}
    saved = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    indent = _Indent()
    logging.getLogger("jaxseq.training.compile").addFilter(indent)
    try:
        yield
    finally:
        logging.getLogger("jaxseq.training.compile").removeFilter(indent)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _table(header: list[str], rows: list[list], formats: list[str]) -> str:
    """A Markdown table; ``formats[i]`` formats column i's numbers (e.g. ".3f"), and a missing value (None) is
    "—". Numeric columns are right-aligned."""
    def cell(value, spec):
        if value is None:
            return "—"
        return format(value, spec) if spec and isinstance(value, (int, float)) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "".join("---:|" if spec else "---|" for spec in formats)]
    lines += ["| " + " | ".join(cell(v, spec) for v, spec in zip(row, formats)) + " |" for row in rows]
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _command(*words, **flags) -> str:
    """A command line in backquotes: ``words`` then ``--flag value`` for each keyword (True: a bare flag)."""
    parts = [str(word) for word in words]
    for name, value in flags.items():
        if value is False or value is None:
            continue
        parts.append(f"--{name.replace('_', '-')}")
        if value is not True:
            parts.append(str(value))
    return "`" + " ".join(parts) + "`"


def _tour_command(cfg: TourConfig, slug: str) -> str:
    """The command that runs one section again with these settings."""
    return _command("jaxseq tour", only=slug, quick=cfg.quick_sizes, seed=cfg.seed, out=f"runs/tour-{slug}")


def _eval_lines(name: str, epochs: int):
    """A callback logging each evaluation (one line per epoch) of a single long training run."""
    from jaxseq.training import LambdaCallback

    def on_record(record: dict) -> None:
        if record["kind"] == "eval":
            values = ", ".join(f"{key} {value:.4g}" for key, value in record.items()
                               if key not in ("kind", "step", "epoch"))
            log.info("    %s: epoch %d/%d (step %d): %s", name, record["epoch"] + 1, epochs, record["step"], values)

    return LambdaCallback(on_record=on_record)


# --- sections: each takes (config, folder) and returns Markdown ------------------------------------------------

def gradient_norms(cfg: TourConfig, folder: pathlib.Path) -> str:
    import jax

    from jaxseq import gradients, plots

    sigma, hidden = 0.9, 32
    # cell: (label, what is measured, the theory line, profile settings)
    runs = {"linear": ("linear", "‖∂h_T/∂h_t‖₂", "‖W^(T−t)‖₂ (exact)", {}),
            "rnn": ("tanh RNN", "‖∂h_T/∂h_t‖₂", "(γ·σ_max)^(T−t) (upper bound)", {}),
            "lstm": ("LSTM, forget bias 1", "‖∂c_T/∂c_t‖₂ (cell path)", "Π f, largest unit (direct path)",
                     {"forget_bias": 1.0})}
    rows, images, results = [], [], {}
    for cell, (label, measures, theory, settings) in runs.items():
        # float64 as `jaxseq gradnorms` computes by default: far-apart norms underflow float32.
        with jax.enable_x64(True):
            result = gradients.profile(cell, steps=cfg.gradnorm_steps, hidden=hidden, sigma=sigma, seed=cfg.seed,
                                       **settings)
        results[cell] = result
        out = folder / cell
        out.mkdir()
        (out / "gradnorms.json").write_text(json.dumps(result, indent=1) + "\n")
        plots.plot_profile(result, out / "gradnorms.png")
        # Index 0 is the first timestep (t = 0), the one farthest from T.
        rows.append([label, measures, result["measured"][0], theory, result["theory"][0]])
        images.append(f"![{label}: {measures}]({cell}/gradnorms.png)")
    # The LSTM's Π f leaves out the paths through h and the gates, which the recurrent weights carry: with those
    # weights near zero the measurement must equal it (checked here, so the sentence below stays true).
    with jax.enable_x64(True):
        still = gradients.profile("lstm", steps=cfg.gradnorm_steps, hidden=hidden, sigma=1e-8, seed=cfg.seed,
                                  forget_bias=1.0)
    lstm = results["lstm"]
    command = _command("jaxseq gradnorms", cell="CELL", steps=cfg.gradnorm_steps, hidden=hidden, sigma_max=sigma,
                       forget_bias=1, seed=cfg.seed, out="runs/gradnorms-CELL")
    return (f"How much of a change at step t = 0 still reaches step T = {cfg.gradnorm_steps}: the norm of the "
            f"Jacobian in the row's \"measures\" column, beside its theory (hidden {hidden}, every recurrent block "
            f"with largest singular value σ_max {sigma}, float64). Reproduce a row: {command} (CELL: linear, rnn "
            "or lstm).\n\n"
            + _table(["cell", "measures", "measured at t = 0", "theory", "theory at t = 0"], rows,
                     ["", "", ".2e", "", ".2e"])
            + "\n\nThe LSTM's theory line Π f is its cell's self-loop alone: ∂c_t/∂c_(t−1) with the gates held "
            "fixed. The measured Jacobian also counts the paths from c_(t−1) through h_(t−1) = o ⊙ tanh(c_(t−1)) "
            "into the next step's gates and candidate, which the recurrent weights carry, so here it is "
            f"{lstm['measured'][0] / lstm['theory'][0]:.3g}× the theory; with those weights scaled to ≈ 0 "
            f"(σ_max 1e-8) the two agree (measured / theory = {still['measured'][0] / still['theory'][0]:.3g}).\n\n"
            + "\n".join(images))


def adding_problem(cfg: TourConfig, folder: pathlib.Path) -> str:
    import jax
    import jax.numpy as jnp
    import optax

    from jaxseq import cells, unroll
    from jaxseq.data import synthetic_tasks

    del folder  # results go into the report only
    hidden = 32
    rows = []
    for name, cell in (("tanh RNN", cells.rnn), ("LSTM (forget bias 1)", cells.lstm)):
        started = time.perf_counter()
        key = jax.random.PRNGKey(cfg.seed)
        k_cell, k_out = jax.random.split(key)
        params = {"cell": cell.init(k_cell, 2, hidden), "V": jax.random.normal(k_out, (hidden, 1)) / hidden ** 0.5,
                  "c": jnp.zeros(1)}
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
        opt_state = tx.init(params)

        def loss_fn(p, xs, ys):
            final, _ = unroll(cell.apply, p["cell"], cell.init_carry(xs.shape[:1], hidden), xs)
            h = cells.hidden_state(final)
            return ((h @ p["V"] + p["c"])[:, 0] - ys) ** 2

        @jax.jit
        def step(p, s, k):
            xs, ys = synthetic_tasks.adding_problem(k, 64, cfg.adding_steps)
            loss, g = jax.value_and_grad(lambda q: loss_fn(q, xs, ys).mean())(p)
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s, loss

        for i in range(cfg.adding_train_steps):
            params, opt_state, _ = step(params, opt_state, jax.random.fold_in(key, i))
        xs, ys = synthetic_tasks.adding_problem(jax.random.PRNGKey(10_000 + cfg.seed), 1000, cfg.adding_steps)
        rows.append([name, float(loss_fn(params, xs, ys).mean())])
        log.info("    %s: test MSE %.4f (%.0f s)", name, rows[-1][1], time.perf_counter() - started)
    return (f"Adding problem, T = {cfg.adding_steps}, {cfg.adding_train_steps} Adam steps of 64 sequences "
            "(clipping at 1). Predicting the mean gives MSE ≈ 0.167; below 0.01 counts as solved. Reproduce: "
            f"{_tour_command(cfg, 'adding')}; the full experiment (T = 100 … 400, gradient profiles) is "
            "`python scripts/gradnorm_adding.py` in a source checkout.\n\n"
            + _table(["cell", "test MSE"], rows, ["", ".4f"]))


def classification(cfg: TourConfig, folder: pathlib.Path) -> str:
    from jaxseq.tasks import classify

    names = {"bag": "bag of frames (order-blind)", "rnn": "tanh RNN", "lstm": "LSTM"}
    rows = []
    for model, name in names.items():
        started = time.perf_counter()
        accuracy = classify.compare(folder, models=(model,), num_train=cfg.classify_train, num_test=500,
                                    epochs=cfg.classify_epochs, seed=cfg.seed, progress=False)[model]
        rows.append([name, accuracy])
        log.info("    %s: test accuracy %.3f (%.0f s)", name, accuracy, time.perf_counter() - started)
    return ("Class = the order of three event frames among noise (6 classes, chance 1/6); lengths vary; "
            f"{cfg.classify_train} training sequences, {_count(cfg.classify_epochs, 'epoch')}. Reproduce: "
            f"{_tour_command(cfg, 'classify')}; the full experiment is `python scripts/classify_order.py` in a "
            "source checkout.\n\n"
            + _table(["model", "test accuracy"], rows, ["", ".3f"]))


def forecast(cfg: TourConfig, folder: pathlib.Path) -> str:
    from jaxseq.tasks import forecast as task

    # The defaults of `jaxseq forecast train`: LSTM on log returns, batch 32, lr 1e-3.
    result = task.train_and_evaluate(task.ForecastConfig(model="lstm"),
                                     _train_config(folder, cfg, cfg.forecast_epochs, batch_size=32,
                                                   learning_rate=1e-3),
                                     callbacks=[_eval_lines("LSTM", cfg.forecast_epochs)])
    metrics = result.metrics["test"]["metrics"]
    # Persistence has no direction: it always forecasts "no change".
    rows = [[name, m["rmse"], m["mae"], m["mase"], m.get("directional_accuracy")] for name, m in metrics.items()]
    test = result.metrics["split"]["test"]
    command = _command("jaxseq forecast train", epochs=cfg.forecast_epochs, seed=cfg.seed, out="runs/tour-forecast")
    return (f"Embedded BTC-USD daily close, test period {test[0]} … {test[1]}, one day ahead (LSTM on log returns, "
            f"{_count(cfg.forecast_epochs, 'epoch')}). Reproduce: {command}. MASE < 1 would beat persistence; "
            "direction is the share of days whose up or down move was forecast right (none for persistence).\n\n"
            + _table(["forecaster", "RMSE ($)", "MAE ($)", "MASE", "direction"], rows, ["", ".1f", ".1f", ".3f", ".3f"])
            + f"\n\n![forecast]({result.figure.name})")


def captioning(cfg: TourConfig, folder: pathlib.Path) -> str:
    from jaxseq.tasks import caption

    # The defaults of `jaxseq caption train`: merge model, batch 64, lr 1e-3, greedy and beam 3.
    result = caption.train_and_evaluate(caption.CaptionTaskConfig(synthetic_images=cfg.caption_images),
                                        _train_config(folder, cfg, cfg.caption_epochs, batch_size=64,
                                                      learning_rate=1e-3),
                                        callbacks=[_eval_lines("merge model", cfg.caption_epochs)])
    report = result.metrics
    rows = [[k.replace("beam", "beam "), *(report[k][f"bleu{n}"] for n in range(1, 5))] for k in report
            if isinstance(report[k], dict) and "bleu1" in report[k]]
    samples = [f"{image}\t{text}" for image, text in result.captions[:6]]
    command = _command("jaxseq caption train", epochs=cfg.caption_epochs, synthetic_images=cfg.caption_images,
                       seed=cfg.seed, out="runs/tour-caption")
    return (f"Merge model on the embedded synthetic picture set ({report['images']} test images, vocabulary "
            f"{report['vocab_size']}, {_count(cfg.caption_epochs, 'epoch')}); corpus BLEU (0–100) with all references "
            f"(sacreBLEU). Reproduce: {command}.\n\n"
            + _table(["decoding", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"], rows, ["", ".2f", ".2f", ".2f", ".2f"])
            + "\n\nSample test captions:\n\n```\n" + "\n".join(samples) + "\n```")


def translation(cfg: TourConfig, folder: pathlib.Path) -> str:
    from jaxseq import plots
    from jaxseq.data import translation as tr
    from jaxseq.tasks import translate

    rows = []
    defaults = translate.TRAINING_DEFAULTS
    for attention in cfg.attention:
        started = time.perf_counter()
        config = translate.TranslateConfig(attention=attention, max_len=cfg.translate_max_len,
                                           bucket_widths=cfg.translate_bucket_widths)
        train_config = _train_config(folder / attention, cfg, cfg.translate_epochs, batch_size=defaults["batch_size"],
                                     learning_rate=defaults["learning_rate"], log_every=20)
        result = translate.train_and_evaluate(config, train_config)
        dev = result.metrics["dev"]
        rows.append([attention, dev["sacrebleu"], dev["tokenized_bleu"], result.metrics["dev_loss"]])
        log.info("    %s attention: dev sacreBLEU %.2f (%.0f s)", attention, dev["sacrebleu"],
                 time.perf_counter() - started)
    scored = [(row[1], row[0]) for row in rows if row[0] != "none"]
    with_attention = max(scored)[1] if scored else None  # the example below uses the best score function
    # The sizes that differ from the command line's defaults (none in the full tour) are spelled out.
    widths = cfg.translate_bucket_widths
    command = _command("jaxseq translate train", attention="ATTENTION",
                       epochs=None if cfg.translate_epochs == defaults["epochs"] else cfg.translate_epochs,
                       max_len=None if config.max_len == translate.TranslateConfig().max_len else config.max_len,
                       bucket_widths=",".join(map(str, widths)) if widths else None, seed=cfg.seed,
                       out="runs/tour-ATTENTION")
    text = (f"Tatoeba English→Vietnamese, training pairs up to {cfg.translate_max_len} tokens, "
            f"{_count(cfg.translate_epochs, 'epoch')} per model, the command line's model (a bidirectional "
            f"{config.cell.upper()} encoder {config.hidden}+{config.hidden}, embeddings {config.embed}, dropout "
            f"{config.dropout}, batch {train_config.batch_size}, Adam {train_config.learning_rate:g}); dev BLEU with "
            f"beam {config.beam} (sacreBLEU on detokenised output, and tokenised). Reproduce a row: {command} "
            "(ATTENTION: the row's). docs/translation.md compares all six score functions and three seeds, on "
            "the held-out test split too.\n\n"
            + _table(["attention", "sacreBLEU", "tokenised BLEU", "dev loss"], rows, ["", ".2f", ".2f", ".3f"]))
    if with_attention:
        run = translate.load_run(folder / with_attention)
        prediction = translate.predict(run, "I love teaching", beam=5)
        plots.attention_map(run.attention(prediction.source, prediction.target), prediction.source,
                            prediction.target + [tr.EOS], folder / "attention.png",
                            title=f"{with_attention} attention")
        predict = _command(f"jaxseq translate predict --run runs/tour-{with_attention} \"I love teaching\"", beam=5,
                           plot="attention.png")
        text += (f"\n\nThe best score function's model ({with_attention}) on \"I love teaching\": "
                 f"“{prediction.text or '(nothing)'}”; its attention map ({predict}):"
                 "\n\n![attention map](attention.png)")
    return text


def _calls_per_sample(fn, min_sample_s: float = 0.02) -> int:
    """Warm ``fn`` up and return how many calls one timed sample needs to last ``min_sample_s``."""
    for _ in range(3):  # jit compilation, and torch's first calls (tens to hundreds of ms while it sets up)
        fn()
    t0 = time.perf_counter()
    fn()
    return max(1, int(min_sample_s / max(time.perf_counter() - t0, 1e-6)))


def speed(cfg: TourConfig, folder: pathlib.Path) -> str:
    import functools
    import importlib.util
    import platform
    import statistics

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxseq import cells, layers

    B, T, I, H = cfg.speed_shape
    rng = np.random.default_rng(cfg.seed)
    x = rng.standard_normal((B, T, I)).astype(np.float32)
    r = rng.standard_normal((B, T, H)).astype(np.float32)
    params = cells.lstm.init(jax.random.PRNGKey(cfg.seed), I, H)
    xj, rj = jnp.asarray(x), jnp.asarray(r)

    def jaxseq_fns(impl):
        forward = jax.jit(lambda p, xs: layers.lstm(p, xs, impl=impl)[1])
        grad = jax.jit(jax.grad(lambda p, xs: jnp.sum(layers.lstm(p, xs, impl=impl)[1] * rj)))
        return {"forward": lambda: jax.block_until_ready(forward(params, xj)),
                "train": lambda: jax.block_until_ready(grad(params, xj))}

    peers = {"jaxseq (default, impl=\"auto\")": jaxseq_fns("auto"), "jaxseq impl=\"scan\"": jaxseq_fns("scan")}
    installed, missing, restore = [], [], lambda: None
    if importlib.util.find_spec("torch") is None:
        missing.append("PyTorch (`pip install torch`) for `torch.nn.LSTM`")
    else:
        import torch

        installed.append(f"PyTorch {torch.__version__} (`torch.nn.LSTM`, one thread)")
        # One thread: in one process with XLA, torch's spinning OpenMP workers and XLA's threads contend, and two
        # torch threads took ~300 ms a call on 2 cores against 0.1 ms for one.
        restore = functools.partial(torch.set_num_threads, torch.get_num_threads())
        torch.set_num_threads(1)
        torch.manual_seed(cfg.seed)
        lstm = torch.nn.LSTM(I, H, batch_first=True)
        x_t, r_t = torch.from_numpy(x), torch.from_numpy(r)

        def torch_train():
            for p in lstm.parameters():
                p.grad = None
            (lstm(x_t)[0] * r_t).sum().backward()

        def torch_forward():
            with torch.inference_mode():
                lstm(x_t)

        peers["torch nn.LSTM"] = {"forward": torch_forward, "train": torch_train}
    # Warm up (compile) each, pick the calls per sample, then sample every peer in turn, `repeats` times over,
    # so a slow moment of the machine falls on all of them alike.
    try:
        calls = {(name, mode): _calls_per_sample(fn) for name, fns in peers.items() for mode, fn in fns.items()}
        samples = {key: [] for key in calls}
        for _ in range(cfg.speed_repeats):
            for (name, mode), inner in calls.items():
                fn = peers[name][mode]
                # One untimed call first: the previous peer's threads may still spin on the cores (libgomp's
                # wait policy after a torch call), which would be charged to this one.
                fn()
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples[(name, mode)].append((time.perf_counter() - t0) / inner)
    finally:
        restore()
    median = {key: statistics.median(values) for key, values in samples.items()}
    default = next(iter(peers))
    rows = [[name, 1e3 * median[(name, "forward")], 1e3 * median[(name, "train")],
             median[(name, "train")] / median[(default, "train")]] for name in peers]
    machine = [platform.machine(), f"{os.cpu_count()} cores"]
    if hasattr(os, "getloadavg"):  # Unix only; other processes on the cores slow every peer
        machine.append("load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg()) + " over 1, 5, 15 min")
    text = (f"One LSTM layer, float32, batch {B}, {T} steps, {I} inputs, {H} units, on {jax.devices()[0].platform} "
            f"({', '.join(machine)}), jax {jax.__version__}; median of "
            f"{_count(cfg.speed_repeats, 'interleaved sample')} after warm-up. Train = forward and gradient of a loss "
            f"over the outputs. Reproduce: {_tour_command(cfg, 'speed')}.\n\n"
            + _table(["layer", "forward (ms)", "train (ms)", "train time / default"], rows,
                     ["", ".3f", ".3f", ".2f"])
            + "\n\nPeers installed: " + (", ".join(installed) if installed else "none")
            + ". Not installed: " + (", ".join(missing) if missing else "none")
            + ". `benchmarks/bench_lstm.py` in a source checkout compares more peers (Flax, Keras) and shapes.")
    (folder / "speed.md").write_text(text + "\n")
    return text


SECTIONS: list[tuple[str, str, Callable]] = [
    ("gradients", "Gradient norms against theory", gradient_norms),
    ("adding", "Learning a long dependency: the adding problem", adding_problem),
    ("classify", "Many-to-one classification", classification),
    ("forecast", "Bitcoin forecast against baselines", forecast),
    ("caption", "Image captioning (synthetic pictures)", captioning),
    ("translate", "English→Vietnamese with attention", translation),
    ("speed", "LSTM speed against the peers", speed),
]


def run_tour(cfg: TourConfig, only: tuple[str, ...] = (), say: Callable[[str], None] = log.info
              ) -> tuple[pathlib.Path, dict[str, str]]:
    """Run every section (or those named in ``only``) into ``cfg.out``; return the report path and each section's
    status. ``say`` gets a line as each section starts and ends."""
    unknown = sorted(set(only) - {slug for slug, _, _ in SECTIONS})
    if unknown:
        raise ValueError(f"no tour section {unknown[0]!r}; expected one of {', '.join(s for s, _, _ in SECTIONS)}")
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    report = ["# jaxseq tour", "", f"Every topic on embedded data; seed {cfg.seed}. Each section names the command "
              "that reproduces it.", ""]
    status, started = {}, time.perf_counter()
    chosen = [(number, *section) for number, section in enumerate(SECTIONS, 1) if not only or section[0] in only]
    for number, slug, title, section in chosen:
        folder = out / slug
        shutil.rmtree(folder, ignore_errors=True)  # a re-run of the tour starts each section afresh
        folder.mkdir(parents=True)
        say(f"[{number}/{len(SECTIONS)}] {title}: started ({time.perf_counter() - started:.0f} s into the tour)")
        t0 = time.perf_counter()
        try:
            with _quiet_library():
                body = section(cfg, folder).replace("](", f"]({slug}/").replace(f"]({slug}/http", "](http")
            status[slug] = f"ok in {time.perf_counter() - t0:.0f} s"
        except Exception as error:  # one broken section must not lose the others
            (folder / "error.txt").write_text(traceback.format_exc())
            body = f"**Failed**: {type(error).__name__}: {error} (traceback in {slug}/error.txt)"
            status[slug] = f"FAILED ({type(error).__name__}: {error})"
        if not any(folder.iterdir()):
            folder.rmdir()  # a section that keeps its results in the report alone leaves no empty folder
        say(f"[{number}/{len(SECTIONS)}] {title}: {status[slug]}")
        report += [f"## {number}. {title}", "", body, ""]
        (out / "README.md").write_text("\n".join(report))  # written after every section: nothing lost on a crash
    return out / "README.md", status


def main(out: str | None, *, quick: bool, seed: int, only: tuple[str, ...] = ()) -> int:
    out_dir = pathlib.Path(out or f"runs/tour-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = TourConfig.quick(out_dir, seed) if quick else TourConfig(out=out_dir, seed=seed)
    started = time.perf_counter()
    path, status = run_tour(cfg, only)
    print(f"\njaxseq tour finished in {time.perf_counter() - started:.0f} s; report: {path}")
    for slug, state in status.items():
        print(f"  {slug:<10} {state}")
    return 0 if all(s.startswith("ok") for s in status.values()) else 1
