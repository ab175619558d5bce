"""``jaxseq tour``: every topic end to end on embedded data, one report folder (see ``jaxseq.tour``)."""
from __future__ import annotations

# The slugs of jaxseq.tour.SECTIONS, here so that `jaxseq --help` does not import the tour (tests check they agree).
SECTIONS = ("gradients", "adding", "classify", "forecast", "caption", "translate", "speed")


def register(subparsers) -> None:
    p = subparsers.add_parser("tour", help="run every topic on embedded data and write one report",
                              description="Gradient norms vs theory, the adding problem, order classification, "
                              "Bitcoin forecast, synthetic captioning, Tatoeba en->vi with attention and the LSTM "
                              "speed table, into one report folder (README.md with figures and tables).")
    p.add_argument("--out", default=None, help="report folder (default runs/tour-<time>)")
    p.add_argument("--quick", action="store_true", help="small sizes: about 90 s on 2 CPU cores (CI)")
    p.add_argument("--seed", type=int, default=0, help="seed of every section's weights, data and dropout")
    p.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                   help="run only this section (repeatable): " + ", ".join(SECTIONS) + " (default: all)")
    p.set_defaults(run=_run)


def _run(args) -> int:
    from jaxseq import tour

    return tour.main(args.out, quick=args.quick, seed=args.seed, only=tuple(args.only or ()))
