"""Check that `train_digits.py`, rerun with its seed, reproduces the committed digits model.

    python benchmarks/train_digits.py --out /tmp/rerun/digits-sd15 --results-dir /tmp/rerun/results
    python benchmarks/check_digits_repro.py /tmp/rerun [--results-dir benchmarks/results]

Compares every safetensors tensor of the rerun's weights with `compiler/data/digits-sd15/` (bit for bit, and the
largest difference), and the rerun's judged measurements (`<rerun>/results/digits_model.json`) with the stored
`results/digits_model.json`: prompt accuracy within 3 points and Fréchet distance within 10% (the issue's bar).
Writes `<results-dir>/digits_repro.{json,md}`; exits 1 when a bar is missed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_common import new_results, write_results  # noqa: E402

NAME = "digits_repro"
SHIPPED = REPO / "compiler" / "data" / "digits-sd15"


def compare_weights(rerun: Path) -> list[dict]:
    from safetensors.torch import load_file

    rows = []
    for file in sorted(SHIPPED.rglob("*.safetensors")):
        shipped, again = load_file(file), load_file(rerun / file.relative_to(SHIPPED))
        if set(shipped) != set(again):
            rows.append({"file": str(file.relative_to(SHIPPED)), "tensors": len(shipped), "same_names": False})
            continue
        diffs = [float((shipped[k].float() - again[k].float()).abs().max()) for k in shipped]
        identical = all(bool((shipped[k] == again[k]).all()) for k in shipped)
        rows.append(
            {
                "file": str(file.relative_to(SHIPPED)),
                "tensors": len(shipped),
                "same_names": True,
                "bit_identical": identical,
                "max_abs_diff": max(diffs),
            }
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rerun", type=Path, help="folder holding the rerun's digits-sd15/ and results/")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    stored = json.loads((HERE / "results" / "digits_model.json").read_text())["evaluation"]["guidance_5"]
    rerun_results = json.loads((args.rerun / "results" / "digits_model.json").read_text())
    again = rerun_results["evaluation"]["guidance_5"]
    weights = compare_weights(args.rerun / "digits-sd15")
    results = new_results(NAME, ("sd-compiler", "torch", "diffusers", "scikit-learn"))
    accuracy = (stored["prompt_accuracy"], again["prompt_accuracy"])
    frechet = (stored["frechet_distance"], again["frechet_distance"])
    results |= {
        "rerun_training": rerun_results["training"],
        "weights": weights,
        "prompt_accuracy": {
            "stored": accuracy[0],
            "rerun": accuracy[1],
            "within_3_points": abs(accuracy[0] - accuracy[1]) <= 0.03,
        },
        "frechet": {
            "stored": frechet[0],
            "rerun": frechet[1],
            "within_10_percent": abs(frechet[1] / frechet[0] - 1) <= 0.10,
        },
    }
    ok = results["prompt_accuracy"]["within_3_points"] and results["frechet"]["within_10_percent"]
    lines = [
        "# Rerunning train_digits.py reproduces the committed digits model",
        "",
        f"Checked by `benchmarks/check_digits_repro.py` on {results['date']}: the rerun of `benchmarks/train_digits.py "
        f"--seed 0` (written {rerun_results['date']}, training {rerun_results['training']['wall_s']:.1f} s) against "
        "`compiler/data/digits-sd15/` and `results/digits_model.json`.",
        "",
        "| file | tensors | bit-identical | max abs difference |",
        "| --- | --- | --- | --- |",
        *(
            f"| {w['file']} | {w['tensors']} | {w.get('bit_identical', False)} | {w.get('max_abs_diff', 'names differ')} |"
            for w in weights
        ),
        "",
        "| measure | stored | rerun | bar | met |",
        "| --- | --- | --- | --- | --- |",
        f"| prompt accuracy, guidance 5 | {100 * accuracy[0]:.1f}% | {100 * accuracy[1]:.1f}% | within 3 points | {results['prompt_accuracy']['within_3_points']} |",
        f"| Fréchet distance | {frechet[0]:.2f} | {frechet[1]:.2f} | within 10% | {results['frechet']['within_10_percent']} |",
    ]
    write_results(results, "\n".join(lines) + "\n", args.results_dir, NAME)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
