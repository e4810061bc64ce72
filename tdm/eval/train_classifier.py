"""Train the digit classifier and record its held-out accuracy and metric floor:
`python -m tdm.eval.train_classifier [--output DIR]`."""

from __future__ import annotations

import argparse
import json
import time

import torch

from ..families.digits.data import load_digits_split
from .classifier import ASSET_DIR, save_classifier, train_classifier
from .digit_metrics import DigitMetrics

SEED = 0
STEPS, BATCH_SIZE, LR = 3000, 128, 2e-3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default=str(ASSET_DIR), help="folder for classifier.safetensors/.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # 8x8 images: thread wake-ups cost more than they save
    split = load_digits_split(seed=SEED)
    start = time.time()
    model = train_classifier(split, steps=STEPS, batch_size=BATCH_SIZE, lr=LR, seed=SEED)
    wall = time.time() - start
    evaluator = DigitMetrics(model, split)
    n = len(split.test_y)
    metrics = {
        "held_out_accuracy": evaluator.evaluate(split.test_x, split.test_y)["accuracy"],
        "floor": {"n": n, "seed": SEED, **evaluator.floor(n, torch.Generator().manual_seed(SEED))},
        "train": {"steps": STEPS, "batch_size": BATCH_SIZE, "lr": LR, "seed": SEED, "wall_s": round(wall, 1),
                  "n_train": len(split.train_y), "n_held_out": n},
    }
    save_classifier(model, args.output, metrics)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
