"""The tour: every chapter end to end on embedded data, one report folder (``jaxseq tour``).

Sections (each in its own sub-folder of ``out``, collected in ``out/README.md``):

1. gradient norms against theory (linear, tanh RNN, LSTM) — ``jaxseq.gradients.profile`` (``jaxseq gradnorms``)
2. learning a long dependency: the adding problem, LSTM against a tanh RNN
3. many-to-one classification where only the order of events matters — ``jaxseq.tasks.classify``
4. Bitcoin forecast against persistence, drift and linear AR — ``jaxseq.tasks.forecast``
5. captioning the synthetic picture set, greedy and beam — ``jaxseq.tasks.caption``
6. English→Vietnamese on Tatoeba with attention: BLEU per score function, an attention map —
   ``jaxseq.tasks.translate``
7. the LSTM layer's speed: the default layer against ``impl="scan"`` and PyTorch's ``nn.LSTM`` when installed,
   timed in this process (no source checkout needed; ``benchmarks/bench_lstm.py`` is the full comparison)

Every section calls the same task functions the command line calls, with the command line's defaults, and
formats what they return; a section that fails is reported as such and the tour goes on, so one broken piece
does not lose the rest. ``quick=True`` shrinks every section so the whole tour runs in about 90 s on 2 CPU
cores (the test suite runs it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib
import shutil
import sys
import time
import traceback
from typing import Callable

SCORE_FUNCTIONS = ("none", "cosine", "additive", "location", "general", "dot", "scaled_dot")


@dataclasses.dataclass(frozen=True)
class TourConfig:
    """Sizes of each section; ``quick()`` gives the CI-sized tour."""

    out: pathlib.Path
    seed: int = 0
    gradnorm_steps: int = 100  # T of the gradient-norm profiles
    adding_steps: int = 50  # sequence length of the adding problem
    adding_train_steps: int = 1500  # optimisation steps per cell on the adding problem
    classify_train: int = 2000  # order-classification training sequences
    classify_epochs: int = 10
    forecast_epochs: int = 10
    caption_epochs: int = 6
    caption_images: int = 1200
    translate_epochs: int = 6  # 37-45 s per score function on 2 CPU cores: dev BLEU 4-7 with attention, 3 without
    translate_max_len: int = 10  # Tatoeba pairs up to this many tokens
    attention: tuple = SCORE_FUNCTIONS
    speed_shape: tuple = (1, 100, 128, 256)  # batch, time, input, hidden of the timed LSTM layer
    speed_repeats: int = 5  # interleaved samples per implementation and mode; the median is reported

    @classmethod
    def quick(cls, out, seed: int = 0) -> "TourConfig":
        # Every section at its smallest (the test suite runs this): the time is mostly compilation, so one
        # translation model and one timing repeat instead of more steps.
        return cls(out=pathlib.Path(out), seed=seed, gradnorm_steps=30, adding_steps=20, adding_train_steps=60,
                   classify_train=256, classify_epochs=1, forecast_epochs=1, caption_epochs=1, caption_images=96,
                   translate_epochs=1, translate_max_len=4, attention=("additive",),
                   speed_shape=(1, 20, 16, 32), speed_repeats=1)


def _train_config(folder: pathlib.Path, cfg: TourConfig, epochs: int, **fields):
    """The command line's ``TrainConfig`` for a section: absolute folder, no progress bar."""
    from jaxseq.training import TrainConfig

    return TrainConfig(out_dir=str(folder.resolve()), seed=cfg.seed, epochs=epochs, progress=False, **fields)


@contextlib.contextmanager
def _quiet_library():
    """Only warnings from the tasks and the training loop while the tour runs: its report is the output."""
    loggers = [logging.getLogger(name) for name in ("jaxseq.tasks", "jaxseq.training")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# --- sections: each takes (config, folder) and returns Markdown ------------------------------------------------

def gradient_norms(cfg: TourConfig, folder: pathlib.Path) -> str:
    import jax

    from jaxseq import gradients, plots

    runs = {"linear (σ_max 0.9, exact theory)": ("linear", {}),
            "tanh RNN (σ_max 0.9, upper bound)": ("rnn", {}),
            "LSTM (forget bias 1, Π f)": ("lstm", {"forget_bias": 1.0})}
    rows, images = [], []
    for label, (cell, settings) in runs.items():
        # float64 as `jaxseq gradnorms` computes by default: far-apart norms underflow float32.
        with jax.enable_x64(True):
            result = gradients.profile(cell, steps=cfg.gradnorm_steps, hidden=32, sigma=0.9, seed=cfg.seed,
                                       **settings)
        out = folder / cell
        out.mkdir()
        (out / "gradnorms.json").write_text(json.dumps(result, indent=1) + "\n")
        plots.plot_profile(result, out / "gradnorms.png")
        # Index 0 is the first timestep (t = 0), the one farthest from T.
        rows.append([label, result["timesteps"][0], result["measured"][0], result["theory"][0],
                     result["theory_kind"]])
        images.append(f"![{label}]({cell}/gradnorms.png)")
    return ("‖∂h_T/∂h_t‖ at the farthest step t against the theory of chapter 17 (`jaxseq gradnorms --cell "
            "linear|rnn|lstm`).\n\n" + _table(["cell", "t", "measured", "theory", "kind"], rows) + "\n\n"
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
    return (f"Adding problem, T = {cfg.adding_steps}, {cfg.adding_train_steps} Adam steps of 64 sequences "
            "(clipping at 1). Predicting the mean gives MSE ≈ 0.167; below 0.01 counts as solved. The full "
            "experiment (T = 100 … 400, gradient profiles) is `scripts/gradnorm_adding.py`.\n\n"
            + _table(["cell", "test MSE"], rows))


def classification(cfg: TourConfig, folder: pathlib.Path) -> str:
    from jaxseq.tasks import classify

    results = classify.compare(folder, num_train=cfg.classify_train, num_test=500, epochs=cfg.classify_epochs,
                               seed=cfg.seed, progress=False)
    names = {"bag": "bag of frames (order-blind)", "rnn": "RNN", "lstm": "LSTM"}
    return ("Class = the order of three event frames among noise (6 classes, chance 1/6); lengths vary "
            "(`python scripts/classify_order.py`).\n\n"
            + _table(["model", "test accuracy"], [[names[k], v] for k, v in results.items()]))


def forecast(cfg: TourConfig, folder: pathlib.Path) -> str:
    from jaxseq.tasks import forecast as task

    # The defaults of `jaxseq forecast train`: LSTM on log returns, batch 32, lr 1e-3.
    result = task.train_and_evaluate(task.ForecastConfig(model="lstm"),
                                     _train_config(folder, cfg, cfg.forecast_epochs, batch_size=32,
                                                   learning_rate=1e-3))
    metrics = result.metrics["test"]["metrics"]
    rows = [[name, m["rmse"], m["mae"], m["mase"], m.get("directional_accuracy", "-")] for name, m in metrics.items()]
    test = result.metrics["split"]["test"]
    return (f"Embedded BTC-USD daily close, test period {test[0]} … {test[1]}, one day ahead (LSTM on log returns, "
            f"{cfg.forecast_epochs} epochs; `jaxseq forecast train --epochs {cfg.forecast_epochs}`). MASE < 1 "
            "would beat persistence.\n\n"
            + _table(["forecaster", "RMSE $", "MAE $", "MASE", "direction"], rows)
            + f"\n\n![forecast]({result.figure.name})")


def captioning(cfg: TourConfig, folder: pathlib.Path) -> str:
    from jaxseq.tasks import caption

    # The defaults of `jaxseq caption train`: merge model, batch 64, lr 1e-3, greedy and beam 3.
    result = caption.train_and_evaluate(caption.CaptionTaskConfig(synthetic_images=cfg.caption_images),
                                        _train_config(folder, cfg, cfg.caption_epochs, batch_size=64,
                                                      learning_rate=1e-3))
    report = result.metrics
    rows = [[k, *(report[k][f"bleu{n}"] for n in range(1, 5))] for k in report if isinstance(report[k], dict)
            and "bleu1" in report[k]]
    samples = [f"{image}\t{text}" for image, text in result.captions[:6]]
    return (f"Merge model on the embedded synthetic picture set ({report['images']} test images, vocabulary "
            f"{report['vocab_size']}; `jaxseq caption train --epochs {cfg.caption_epochs} --synthetic-images "
            f"{cfg.caption_images}`); corpus BLEU with all references (sacreBLEU).\n\n"
            + _table(["decoding", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"], rows)
            + "\n\nSample test captions:\n\n```\n" + "\n".join(samples) + "\n```")


def translation(cfg: TourConfig, folder: pathlib.Path) -> str:
    from jaxseq import plots
    from jaxseq.data import translation as tr
    from jaxseq.tasks import translate

    rows = []
    for attention in cfg.attention:
        # One padded width instead of length buckets: at <= 10 tokens padding wastes little, while each bucket
        # shape costs its own ~8 s compilation (six shapes took most of a short run's time).
        config = translate.TranslateConfig(attention=attention, max_len=cfg.translate_max_len,
                                           bucket_widths=(cfg.translate_max_len + 1,), hidden=64, embed=64, beam=3)
        result = translate.train_and_evaluate(config, _train_config(folder / attention, cfg, cfg.translate_epochs,
                                                                    batch_size=64, learning_rate=5e-3,
                                                                    log_every=20))
        dev = result.metrics["dev"]
        rows.append([attention, dev["sacrebleu"], dev["tokenized_bleu"], result.metrics["dev_loss"]])
    scored = [(row[1], row[0]) for row in rows if row[0] != "none"]
    with_attention = max(scored)[1] if scored else None  # the example below uses the best score function
    text = (f"Tatoeba English→Vietnamese, sentences up to {cfg.translate_max_len} tokens, {cfg.translate_epochs} "
            "epochs per model, one padded width (docs/translation.md trains 16 epochs with length buckets); "
            "dev BLEU (sacreBLEU on detokenised output, and tokenised).\n\n"
            + _table(["attention", "sacreBLEU", "tokenised BLEU", "dev loss"], rows))
    if with_attention:
        run = translate.load_run(folder / with_attention)
        prediction = translate.predict(run, "I love teaching", beam=5)
        plots.attention_map(run.attention(prediction.source, prediction.target), prediction.source,
                            prediction.target + [tr.EOS], folder / "attention.png",
                            title=f"{with_attention} attention")
        text += (f"\n\n`jaxseq translate predict \"I love teaching\"` ({with_attention}): {prediction.text}"
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
    installed, restore = [], lambda: None
    if importlib.util.find_spec("torch") is not None:
        import torch

        installed.append(f"torch {torch.__version__} (`torch.nn.LSTM`, one thread)")
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
    text = (f"One LSTM layer, float32, batch {B}, {T} steps, {I} inputs, {H} units, on {jax.devices()[0].platform} "
            f"({platform.machine()}), jax {jax.__version__}; median of {cfg.speed_repeats} interleaved samples after "
            "warm-up. Train = gradient of a loss over the outputs.\n\n"
            + _table(["layer", "forward ms", "train ms", "train time / default"], rows)
            + "\n\nPeers installed: " + (", ".join(installed) if installed else "none (torch is not installed; "
                                          "jaxseq's own implementations only)")
            + ". `benchmarks/bench_lstm.py` in a source checkout compares more peers and shapes.")
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


def run_tour(cfg: TourConfig, log=print) -> tuple[pathlib.Path, dict[str, str]]:
    """Run every section into ``cfg.out``; return the report path and each section's status."""
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    report = ["# jaxseq tour", "", f"Every chapter on embedded data; seed {cfg.seed}. Each section says which "
              "command reproduces it.", ""]
    status, started = {}, time.perf_counter()
    for number, (slug, title, section) in enumerate(SECTIONS, 1):
        folder = out / slug
        shutil.rmtree(folder, ignore_errors=True)  # a re-run of the tour starts each section afresh
        folder.mkdir(parents=True)
        log(f"[{number}/{len(SECTIONS)}] {title} ... ({time.perf_counter() - started:.0f} s so far)")
        t0 = time.perf_counter()
        try:
            with _quiet_library():
                body = section(cfg, folder).replace("](", f"]({slug}/").replace(f"]({slug}/http", "](http")
            status[slug] = f"ok in {time.perf_counter() - t0:.0f} s"
        except Exception as error:  # one broken section must not lose the others
            (folder / "error.txt").write_text(traceback.format_exc())
            body = f"**Failed**: {type(error).__name__}: {error} (traceback in {slug}/error.txt)"
            status[slug] = f"FAILED ({type(error).__name__}: {error})"
        log(f"    {status[slug]}")
        report += [f"## {number}. {title}", "", body, ""]
        (out / "README.md").write_text("\n".join(report))  # written after every section: nothing lost on a crash
    return out / "README.md", status


def main(out: str | None, *, quick: bool, seed: int) -> int:
    out_dir = pathlib.Path(out or f"runs/tour-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = TourConfig.quick(out_dir, seed) if quick else TourConfig(out=out_dir, seed=seed)
    started = time.perf_counter()
    path, status = run_tour(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"\njaxseq tour finished in {time.perf_counter() - started:.0f} s; report: {path}")
    for slug, state in status.items():
        print(f"  {slug:<10} {state}")
    return 0 if all(s.startswith("ok") for s in status.values()) else 1
