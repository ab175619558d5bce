"""Many-to-one classification where only the ORDER of events carries the class (chapter 16's first example).

Run:    python scripts/classify_order.py [--out runs/classify] [--steps 20] [--epochs 15]
Expect: (T=20, 3,000 training sequences, 15 epochs, about a minute per model on 2 CPU cores)
        order-blind bag of frames ≈ 0.17 (chance, 1/6), RNN and LSTM ≈ 1.0 test accuracy.
"""
import argparse
import json

from jaxseq.tasks import classify

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="runs/classify")
parser.add_argument("--steps", type=int, default=20, help="sequence length T")
parser.add_argument("--epochs", type=int, default=15)
parser.add_argument("--models", default="bag,rnn,lstm")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
results = classify.compare(args.out, models=args.models.split(","), num_steps=args.steps, epochs=args.epochs,
                           seed=args.seed)
print(json.dumps({"test_accuracy": results, "num_steps": args.steps, "chance": 1 / 6}, indent=2))
