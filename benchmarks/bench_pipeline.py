"""The whole pipeline on the demo digits: wall time and throughput per stage, quality figures,
then the same command again (which must reuse the finished stages).

    python -m benchmarks.bench_pipeline [--preset small]

Runs in a fresh temporary MLflow store, so it always trains from scratch.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd, env):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode:
        sys.exit(result.stderr[-2000:])
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(ROOT),
               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
        from pipeline.demo_data import write_digits
        train_csv, heldout_csv = write_digits(tmp / "digits")
        command = ["--path_to_data", str(train_csv), "--heldout", str(heldout_csv),
                   "--out_dir", str(tmp / "out"), "--preset", args.preset, *extra]
        first = run(command, tmp, env)
        summary = json.loads((tmp / "out" / "summary.json").read_text())
        second = run(command, tmp, env)
        again = json.loads((tmp / "out" / "summary.json").read_text())

    t, m, s = summary["timings"], summary["metrics"], summary["settings"]
    vq, pr = s["tokenizer"], s["prior"]
    print(f"preset {args.preset}: 1,500 training digits, judged against 297 held-out digits")
    print(f"first run : {first:6.1f} s wall (process), stages: vqvae {t['tokenizer_s']:.1f} s "
          f"({vq['max_steps'] * vq['batch_size'] / t['tokenizer_s']:.0f} images/s incl. eval), "
          f"quantize {t['quantize_s']:.1f} s, prior {t['prior_s']:.1f} s "
          f"({pr['max_steps'] * pr['batch_size'] * 16 / t['prior_s']:.0f} tokens/s incl. eval), "
          f"generate+decode {t['generate_s']:.1f} s "
          f"({t['sampling_codes_per_s']:.0f} codes/s sampling), quality {t['quality_s']:.1f} s")
    print(f"second run: {second:6.1f} s wall ({second / first:.0%} of the first; stages "
          f"{again['stages']})")
    print(f"VQ-VAE: val/psnr_db {m['tokenizer/val/psnr_db']:.2f}, val/codebook_usage "
          f"{m['tokenizer/val/codebook_usage']:.3f}, val/codebook_perplexity "
          f"{m['tokenizer/val/codebook_perplexity']:.1f}")
    print("prior: " + ", ".join(f"{k[len('prior/'):]} {v:.3f}" for k, v in sorted(m.items())
                                if k.startswith("prior/val/")))
    print(f"samples: FD {m['quality/fd']:.5f} vs real-vs-real {m['quality/fd_real']:.5f} "
          f"(ratio {m['quality/fd_ratio']:.2f}); nearest-train ratio {m['quality/nn_ratio']:.2f}; "
          f"copy fraction {m['quality/copy_fraction']:.3f}; classes present "
          f"{m['quality/classes_present']:.0f}/10 {summary['class_counts']}; classifier "
          f"confidence {m['quality/classifier_confidence']:.2f}")


if __name__ == "__main__":
    main()
