#!/usr/bin/env python
"""Train (or load) the classifier whose penultimate features the flow task's Frechet distance
uses, and print its test accuracy. The flow task calls the same code on first use; this command
makes the step explicit and forces a retrain with --retrain.

    python scripts/train_feature_classifier.py                      # glyphs (scale=cpu config)
    python scripts/train_feature_classifier.py task.dataset=digits task.image_size=8 task.classifier.epochs=30 task.classifier.batch_size=64
    python scripts/train_feature_classifier.py scale=paper           # CIFAR-10 settings
    python scripts/train_feature_classifier.py --retrain task.classifier.epochs=50

Arguments other than --retrain are Hydra overrides of configs/train.yaml (task=flow is implied).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    retrain = "--retrain" in argv
    overrides = [a for a in argv if a != "--retrain"]
    from hydra import compose, initialize_config_dir

    from experiments.engine import pick_device
    from experiments.tasks import flow, flow_metrics

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["task=flow", *overrides])
    data = flow.load_images(cfg.task)
    print(f"data set {cfg.task.dataset}: " + ", ".join(f"{k} {len(v[1])}" for k, v in data.items()))
    net, acc = flow_metrics.feature_classifier(cfg.task, data, pick_device(cfg.device), retrain=retrain)
    print(f"test accuracy {acc:.4f} on {len(data['test'][1])} held-out images; features: {net.num_features} dims")
    return 0


if __name__ == "__main__":
    sys.exit(main())
