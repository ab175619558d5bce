"""The tour: every chapter end to end on embedded data, one report folder (``jaxseq tour``).

Sections (each in its own sub-folder of ``out``, collected in ``out/README.md``):

1. gradient norms against theory (linear, tanh RNN, LSTM) — ``jaxseq gradnorms``
2. learning a long dependency: the adding problem, LSTM against a tanh RNN
3. many-to-one classification where only the order of events matters
4. Bitcoin forecast against persistence, drift and linear AR — ``jaxseq forecast train``
5. captioning the synthetic picture set, greedy and beam — ``jaxseq caption train``
6. English→Vietnamese on Tatoeba with attention: BLEU per score function, an attention map —
   ``jaxseq translate train / predict``
7. the LSTM layer's speed against the peers installed — ``benchmarks/bench_lstm.py`` (from a source checkout)

Every section trains through the same commands a user would type; a section that fails is reported as such
and the tour goes on, so one broken piece does not lose the rest. ``quick=True`` shrinks every section so the
whole tour runs in about 90 s on 2 CPU cores (the test suite runs it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import pathlib
import shutil
import sys
import time
import traceback
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
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
    speed_configs: str = "1:100:128:256"  # B:T:I:H shapes for bench_lstm.py
    speed_repeats: int = 5

    @classmethod
    def quick(cls, out, seed: int = 0) -> "TourConfig":
        # Every section at its smallest (the test suite runs this): the time is mostly compilation, so one
        # translation model and one timing repeat instead of more steps.
        return cls(out=pathlib.Path(out), seed=seed, gradnorm_steps=30, adding_steps=20, adding_train_steps=60,
                   classify_train=256, classify_epochs=1, forecast_epochs=1, caption_epochs=1, caption_images=96,
                   translate_epochs=1, translate_max_len=4, attention=("additive",),
                   speed_configs="1:20:16:32", speed_repeats=1)


def _cli(argv: list[str]) -> str:
    """Run a ``jaxseq`` sub-command in this process (sharing JIT caches) and return what it printed."""
    from jaxseq import cli

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli.main(argv)
    if code:
        raise RuntimeError(f"`jaxseq {' '.join(argv)}` exited with {code}")
    return buffer.getvalue()


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# --- sections: each takes (config, folder) and returns Markdown ------------------------------------------------

def gradient_norms(cfg: TourConfig, folder: pathlib.Path) -> str:
    runs = {"linear (σ_max 0.9, exact theory)": ["--cell", "linear", "--sigma-max", "0.9"],
            "tanh RNN (σ_max 0.9, upper bound)": ["--cell", "rnn", "--sigma-max", "0.9"],
            "LSTM (forget bias 1, Π f)": ["--cell", "lstm", "--forget-bias", "1"]}
    rows, images = [], []
    for label, flags in runs.items():
        out = folder / flags[1]
        _cli(["gradnorms", *flags, "--steps", str(cfg.gradnorm_steps), "--hidden", "32", "--seed", str(cfg.seed),
              "--out", str(out)])
        result = json.loads((out / "gradnorms.json").read_text())
        # Index 0 is the first timestep (t = 0), the one farthest from T.
        rows.append([label, result["timesteps"][0], result["measured"][0], result["theory"][0],
                     result["theory_kind"]])
        images.append(f"![{label}]({flags[1]}/gradnorms.png)")
    return ("‖∂h_T/∂h_t‖ at the farthest step t against the theory of chapter 17 (`jaxseq gradnorms`).\n\n"
            + _table(["cell", "t", "measured", "theory", "kind"], rows) + "\n\n" + "\n".join(images))


def adding_problem(cfg: TourConfig, folder: pathlib.Path) -> str:
    import jax
    import jax.numpy as jnp
    import optax

    from jaxseq import cells, gradients, unroll

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
            h = gradients.hidden_of(final)
            return ((h @ p["V"] + p["c"])[:, 0] - ys) ** 2

        @jax.jit
        def step(p, s, k):
            xs, ys = gradients.adding_problem(k, 64, cfg.adding_steps)
            loss, g = jax.value_and_grad(lambda q: loss_fn(q, xs, ys).mean())(p)
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s, loss

        for i in range(cfg.adding_train_steps):
            params, opt_state, _ = step(params, opt_state, jax.random.fold_in(key, i))
        xs, ys = gradients.adding_problem(jax.random.PRNGKey(10_000 + cfg.seed), 1000, cfg.adding_steps)
        rows.append([name, float(loss_fn(params, xs, ys).mean())])
    return (f"Adding problem, T = {cfg.adding_steps}, {cfg.adding_train_steps} Adam steps of 64 sequences "
            "(clipping at 1). Predicting the mean gives MSE ≈ 0.167; below 0.01 counts as solved. The full "
            "experiment (T = 100 … 400, gradient profiles) is `scripts/gradnorm_adding.py`.\n\n"
            + _table(["cell", "test MSE"], rows))


def classification(cfg: TourConfig, folder: pathlib.Path) -> str:
    from jaxseq.models import classifier

    results = classifier.run_order_comparison(folder, num_train=cfg.classify_train, num_test=500,
                                              epochs=cfg.classify_epochs, seed=cfg.seed, progress=False)
    names = {"bag": "bag of frames (order-blind)", "rnn": "RNN", "lstm": "LSTM"}
    return ("Class = the order of three event frames among noise (6 classes, chance 1/6); lengths vary.\n\n"
            + _table(["model", "test accuracy"], [[names[k], v] for k, v in results.items()]))


def forecast(cfg: TourConfig, folder: pathlib.Path) -> str:
    _cli(["forecast", "train", "--model", "lstm", "--epochs", str(cfg.forecast_epochs), "--seed", str(cfg.seed),
          "--out", str(folder), "--no-progress"])
    result = json.loads((folder / "metrics.json").read_text())
    metrics = result["test"]["metrics"]
    rows = [[name, m["rmse"], m["mae"], m["mase"], m.get("directional_accuracy", "-")] for name, m in metrics.items()]
    test = result["split"]["test"]
    return (f"Embedded BTC-USD daily close, test period {test[0]} … {test[1]}, one day ahead (LSTM on log returns, "
            f"{cfg.forecast_epochs} epochs). MASE < 1 would beat persistence.\n\n"
            + _table(["forecaster", "RMSE $", "MAE $", "MASE", "direction"], rows) + "\n\n![forecast](forecast.png)")


def captioning(cfg: TourConfig, folder: pathlib.Path) -> str:
    _cli(["caption", "train", "--data", "synthetic", "--epochs", str(cfg.caption_epochs), "--synthetic-images",
          str(cfg.caption_images), "--seed", str(cfg.seed), "--out", str(folder), "--no-progress"])
    result = json.loads((folder / "metrics.json").read_text())
    rows = [[k, *(result[k][f"bleu{n}"] for n in range(1, 5))] for k in result if isinstance(result[k], dict)
            and "bleu1" in result[k]]
    samples = (folder / "test_captions.txt").read_text().splitlines()[:6]
    return (f"Merge model on the embedded synthetic picture set ({result['images']} test images, vocabulary "
            f"{result['vocab_size']}); corpus BLEU with all references (sacreBLEU).\n\n"
            + _table(["decoding", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"], rows)
            + "\n\nSample test captions:\n\n```\n" + "\n".join(samples) + "\n```")


def translation(cfg: TourConfig, folder: pathlib.Path) -> str:
    rows = []
    for attention in cfg.attention:
        out = folder / attention
        # One padded width instead of length buckets: at <= 10 tokens padding wastes little, while each bucket
        # shape costs its own ~8 s compilation (six shapes took most of a short run's time).
        _cli(["translate", "train", "--attention", attention, "--epochs", str(cfg.translate_epochs), "--max-len",
              str(cfg.translate_max_len), "--bucket-widths", str(cfg.translate_max_len + 1), "--hidden", "64",
              "--embed", "64", "--lr", "5e-3", "--beam", "3", "--seed", str(cfg.seed), "--out", str(out),
              "--no-progress"])
        result = json.loads((out / "metrics.json").read_text())
        rows.append([attention, result["dev"]["sacrebleu"], result["dev"]["tokenized_bleu"], result["dev_loss"]])
    scored = [(row[1], row[0]) for row in rows if row[0] != "none"]
    with_attention = max(scored)[1] if scored else None  # the example below uses the best score function
    text = (f"Tatoeba English→Vietnamese, sentences up to {cfg.translate_max_len} tokens, {cfg.translate_epochs} "
            "epochs per model, one padded width (docs/translation.md trains 16 epochs with length buckets); "
            "dev BLEU (sacreBLEU on detokenised output, and tokenised).\n\n"
            + _table(["attention", "sacreBLEU", "tokenised BLEU", "dev loss"], rows))
    if with_attention:
        printed = _cli(["translate", "predict", "--run", str(folder / with_attention), "I love teaching", "--plot",
                        str(folder / "attention.png")])
        text += (f"\n\n`jaxseq translate predict \"I love teaching\"` ({with_attention}): "
                 f"{printed.strip().splitlines()[0] if printed.strip() else ''}\n\n![attention map](attention.png)")
    return text


def speed(cfg: TourConfig, folder: pathlib.Path) -> str:
    import importlib.util

    bench = ROOT / "benchmarks" / "bench_lstm.py"
    if not bench.is_file():
        return "Skipped: benchmarks/bench_lstm.py is not here (the tour runs it from a source checkout)."
    spec = importlib.util.spec_from_file_location("bench_lstm", bench)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    impls = ["jaxseq", "scan", "flax"] + [name for name in ("torch", "keras") if importlib.util.find_spec(name)]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        module.main(["--configs", cfg.speed_configs, "--impls", ",".join(impls), "--repeats",
                     str(cfg.speed_repeats), "--min-sample-s", "0.02"])
    (folder / "bench_lstm.txt").write_text(buffer.getvalue())
    return ("One LSTM layer, float32, peers interleaved in one run (the full table is benchmarks/RESULTS.md):\n\n"
            "```\n" + buffer.getvalue().strip() + "\n```")


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
