"""Do the quality figures rank images correctly? The ladder real < lightly blurred < heavily
blurred < row-shuffled < noise, judged against the held-out demo digits, in both feature spaces.

    python -m benchmarks.bench_quality                   # the demo digits (written to /tmp)
    python -m benchmarks.bench_quality --data_dir demo_data --num_images 300 --size 16

Prints one table per feature space (the pipeline's default with labels is
classifier+random) (rows: degradations, columns: figures) and whether each
figure orders the ladder correctly, plus the classifier's fit time and held-out accuracy.
"""

import argparse
import time

import numpy as np
import torch

from pipeline.demo_data import write_digits
from pipeline.images import ImageData, read_table
from pipeline.quality import (DEGRADATIONS, QualityReference, degrade,
                              label_agreement, ranking_ladder)

# figure -> +1 when higher is better, -1 when lower is better
RANKED = {"fd_ratio": -1, "precision": +1, "recall": +1, "classifier_confidence": +1,
          "label_agreement": +1, "classes_present": +1}


def load(csv, size):
    data = ImageData(read_table(csv), 1, size)
    images = torch.cat(list(data.ordered(range(len(data)), 512))).float() / 255
    return images, data.table.labels


def ladder(reference, images, labels, seed=0):
    """{degradation: report}, plus each rung's label agreement when there is a classifier."""
    rows = ranking_ladder(reference, images, seed)
    if reference.classifier is not None:
        for kind, report in rows.items():
            report["label_agreement"] = label_agreement(
                reference.classifier, degrade(images, kind, seed), labels)["agreement"]
    return rows


def ranks_correctly(rows, figure, direction):
    values = [direction * rows[kind][figure] for kind in DEGRADATIONS]
    return all(a > b for a, b in zip(values, values[1:]))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="/tmp/vqtoolkit_demo_data")
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--num_images", type=int, default=300, help="images per ladder rung")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spaces", default="all",
                        choices=("all", "classifier+random", "classifier", "random"))
    args = parser.parse_args()
    train_csv, heldout_csv = write_digits(args.data_dir, args.size)
    train, train_labels = load(train_csv, args.size)
    heldout, heldout_labels = load(heldout_csv, args.size)
    pick = np.random.default_rng(args.seed + 1).choice(len(train), args.num_images, replace=False)
    images, labels = train[torch.from_numpy(pick)], [train_labels[i] for i in pick]
    print(f"{len(train)} training and {len(heldout)} held-out digits at {args.size}x{args.size}; "
          f"{args.num_images} training images per rung; k = 3")

    spaces = ("classifier+random", "classifier", "random") if args.spaces == "all" else (
        args.spaces,)
    for space in spaces:
        with_labels = space != "random"
        started = time.perf_counter()
        reference = QualityReference(heldout, train, train_labels if with_labels else None,
                                     heldout_labels if with_labels else None, seed=args.seed,
                                     feature_space=space)
        setup_s = time.perf_counter() - started
        rows = ladder(reference, images, labels, args.seed)
        figures = [f for f in RANKED if f in rows["real"]]
        print(f"\nfeature space: {space} (reference set-up {setup_s:.1f} s"
              + (f", classifier held-out accuracy "
                 f"{rows['real']['classifier_heldout_accuracy']:.3f}" if with_labels else "")
              + f"); real reference: precision {rows['real']['real_precision']:.3f}, recall "
                f"{rows['real']['real_recall']:.3f}")
        print(f"{'':12s}" + "".join(f"{f:>22s}" for f in figures))
        for kind in DEGRADATIONS:
            print(f"{kind:12s}" + "".join(f"{rows[kind][f]:22.3f}" for f in figures))
        print(f"{'ranks right':12s}" + "".join(
            f"{'yes' if ranks_correctly(rows, f, RANKED[f]) else 'NO':>22s}" for f in figures))
        print("(classes_present and label_agreement saturate at the top: 'NO' there can be a tie)")


if __name__ == "__main__":
    main()
