"""``jaxseq forecast``: train a recurrent forecaster on a daily CSV and compare it with the baselines.

Examples::

    jaxseq forecast train                                        # embedded BTC-USD Close, LSTM, log returns, 1 day
    jaxseq forecast train --csv FILE --column Close --model {rnn,lstm,gru,bilstm} --lookback 60 --horizon 1 \\
        --epochs 20 --seed 0 --out runs/btc-lstm                 # any daily CSV with a date column
    jaxseq forecast predict --run runs/btc-lstm --steps 7        # the next 7 values with their dates
"""
from __future__ import annotations

import pathlib

from jaxseq.commands import finite_float, positive_int, reword


def register(subparsers) -> None:
    parser = subparsers.add_parser("forecast", help="forecast a daily series (Bitcoin by default)",
                                   description=__doc__)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    train = actions.add_parser("train", help="train a model, score it and the baselines on the test period")
    data = train.add_argument_group("data")
    data.add_argument("--csv", help="daily CSV with a header (default: the embedded BTC-USD file)")
    data.add_argument("--column", default="Close", help="column to forecast")
    data.add_argument("--date-column", default="Date", help="column with YYYY-MM-DD dates")
    data.add_argument("--features", default="", help="comma-separated extra input columns, e.g. Volume")
    data.add_argument("--fill", default="error", choices=("error", "ffill", "drop", "interpolate"),
                      help="missing cells: raise naming line and column (default), or fill them this way")
    data.add_argument("--sort-dates", action="store_true", help="sort rows by date instead of raising")
    data.add_argument("--target", default="log_return", choices=("price", "log_price", "log_return"),
                      help="what the model predicts; metrics are always on price")
    data.add_argument("--lookback", type=positive_int, default=60, help="days of history per window")
    data.add_argument("--horizon", type=positive_int, default=1, help="days ahead")
    data.add_argument("--val-fraction", type=finite_float, default=0.15,
                      help="share of the days, just before the test period, for validation (best checkpoint)")
    data.add_argument("--test-fraction", type=finite_float, default=0.15,
                      help="share of the days, at the end of the series, for the test period")
    model = train.add_argument_group("model")
    model.add_argument("--model", default="lstm", choices=("rnn", "lstm", "gru", "bilstm"),
                       help="recurrent layer (bilstm: bidirectional LSTM)")
    model.add_argument("--hidden", type=positive_int, default=32, help="units per layer and direction")
    model.add_argument("--layers", type=positive_int, default=1, help="stacked recurrent layers")
    model.add_argument("--dropout", type=finite_float, default=0.0, help="dropout between stacked layers")
    model.add_argument("--multi-step", default="direct", choices=("direct", "recursive"),
                       help="direct: one head of HORIZON outputs; recursive: a 1-day model fed its own forecasts")
    model.add_argument("--residual", action="store_true", help="forecast the change from the last value")
    loop = train.add_argument_group("training")
    loop.add_argument("--epochs", type=positive_int, default=20, help="passes over the training windows")
    loop.add_argument("--batch-size", type=positive_int, default=32, help="windows per step")
    loop.add_argument("--lr", type=finite_float, default=1e-3, help="Adam learning rate")
    loop.add_argument("--seed", type=int, default=0, help="seed of the initial weights, data order and dropout")
    loop.add_argument("--out", help="run folder (default runs/forecast-<data>-<model>-<target>-h<H>-seed<S>); "
                                    "an existing run there is resumed")
    loop.add_argument("--restart", action="store_true", help="ignore an existing run in --out and start over")
    loop.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=run_train)

    predict = actions.add_parser("predict", help="forecast the next K values after the series ends")
    # dest is not "run": the CLI dispatches on args.run.
    predict.add_argument("--run", dest="run_dir", metavar="DIR", required=True,
                         help="a folder written by `jaxseq forecast train`")
    predict.add_argument("--csv", help="read this CSV instead of the one the run was trained on")
    predict.add_argument("--steps", type=positive_int, default=1, help="days ahead to forecast")
    predict.set_defaults(run=run_predict)


def run_train(args) -> int:
    from jaxseq.tasks.forecast import ForecastConfig, train_and_evaluate
    from jaxseq.training import TrainConfig

    features = tuple(name.strip() for name in args.features.split(",") if name.strip())
    config = ForecastConfig(csv=args.csv, column=args.column, date_column=args.date_column, features=features,
                            fill=args.fill, sort_dates=args.sort_dates, target=args.target,
                            lookback=args.lookback, horizon=args.horizon, multi_step=args.multi_step,
                            val_fraction=args.val_fraction, test_fraction=args.test_fraction, model=args.model,
                            hidden_size=args.hidden, num_layers=args.layers, dropout=args.dropout,
                            residual=args.residual)
    out = args.out or (f"runs/forecast-{pathlib.Path(args.csv).stem if args.csv else 'btc'}-{args.model}-"
                       f"{args.target}-h{args.horizon}-seed{args.seed}")
    # Absolute: Orbax refuses relative checkpoint paths.
    train_config = TrainConfig(out_dir=str(pathlib.Path(out).resolve()), seed=args.seed, epochs=args.epochs,
                               batch_size=args.batch_size, learning_rate=args.lr, restart=args.restart,
                               progress=not args.no_progress)
    try:
        result = train_and_evaluate(config, train_config)
    except ValueError as error:
        raise reword(error) from None
    print(format_table(result.metrics))
    print(f"wrote {out}/metrics.json and {out}/forecast.png")
    return 0


def format_table(results: dict) -> str:
    """The test-period metrics as a Markdown table, models first, then the baselines."""
    test = results["test"]
    lines = [f"test period {results['split']['test'][0]} .. {results['split']['test'][1]}: {test['windows']} "
             f"windows, {test['horizon']}-day horizon",
             "| forecaster | RMSE | MAE | MAPE % | MASE | RMSE / persistence | direction |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in test["metrics"].items():
        direction = "none" if m["directional_accuracy"] is None else f"{m['directional_accuracy']:.3f}"
        mape = "n/a" if m["mape"] is None else f"{m['mape']:.3f}"
        lines.append(f"| {name} | {m['rmse']:.2f} | {m['mae']:.2f} | {mape} | {m['mase']:.3f} | "
                     f"{m['rel_rmse']:.3f} | {direction} |")
    return "\n".join(lines)


def run_predict(args) -> int:
    from jaxseq.tasks import forecast

    dates, values = forecast.predict(forecast.load_run(args.run_dir), args.steps, args.csv)
    print("date,forecast")
    for date, value in zip(dates, values):
        print(f"{date},{value:.6g}")
    return 0
