"""Issue 14's targets, met or not, read from a bench_gpu.py results file, so that a GPU check ends
with the answer rather than a table to work it out from.

    python benchmarks/gpu_targets.py benchmarks/results/gpu_query_NVIDIA_H200_20261126_run4.json
    python benchmarks/gpu_targets.py RESULTS.json --case 16x12x2     # another case of the file

The targets, for the 1920x1080 frame from 480x270 (the case `480x270x4`):
- bf16 and fp16 each reach at least 45% of the card's dense peak and 25x the float32 reference's
  queries per second, with one tensor-core kernel (the best of those the file has);
- exact fp32 at least 1.5x the reference;
- every fused variant's peak memory at most half the reference's.
A variant counts only if its error against the reference is within the bound the tests assert for
its precision and it returned no NaN. Exit status 0 when every target is met, 1 when one is not or
cannot be decided from the file (no dense peak for the card, a variant missing), 2 for a file
without the case.
"""

import argparse
import json
import sys

SPEED_FRACTION = 0.45   # of the dense peak, bf16 and fp16
SPEED_RATIO = 25.0      # queries per second against the float32 reference, bf16 and fp16
FP32_RATIO = 1.5        # exact fp32 against the reference
MEMORY_RATIO = 0.5      # peak memory against the reference's
# Relative error against the float32 reference the tests assert for each precision (operator.md).
ERROR_BOUND = {"fp32": 1e-5, "tf32": 5e-4, "fp16": 1e-3, "bf16": 4e-3}


def precision_of(variant):
    """'fused-bf16-wgmma_ws' -> 'bf16'; None for the reference's variants."""
    parts = variant.split("-")
    return parts[1] if parts[0] == "fused" and len(parts) > 1 else None


def find_row(results, case):
    width, height, scale = (int(v) for v in case.split("x"))
    for row in results["rows"]:
        if row["lr_size_wh"] == [width, height] and row["scale"] == scale:
            return row
    return None


def accurate(row, variant):
    error = row["relative_error"].get(variant)
    return (error is not None and error <= ERROR_BOUND[precision_of(variant)]
            and row["nan_count"].get(variant) == 0)


def speed_lines(row):
    """One line per reduced precision: its best accurate variant against both speed targets."""
    lines, met = [], True
    fractions = row["fraction_of_dense_peak"]
    for precision in ("bf16", "fp16"):
        candidates = [v for v in row["median_s"] if precision_of(v) == precision and accurate(row, v)]
        if not candidates:
            lines.append(f"{precision}: no accurate variant in the file: NOT MET")
            met = False
            continue
        best = min(candidates, key=lambda v: row["median_s"][v])
        ratio = row["speedup_vs_reference"][best]
        fraction = None if fractions is None else fractions[best]
        ok = fraction is not None and fraction >= SPEED_FRACTION and ratio >= SPEED_RATIO
        met = met and ok
        shown = ("no dense peak known for this card" if fraction is None
                 else f"{fraction:.1%} of the dense peak")
        lines.append(f"{precision}: best {best} {row['median_s'][best] * 1e3:.2f} ms, {shown} "
                     f"(target {SPEED_FRACTION:.0%}), {ratio:.2f}x the reference (target "
                     f"{SPEED_RATIO:g}x): {'met' if ok else 'NOT MET'}")
    return lines, met


def fp32_line(row):
    variant = "fused-fp32"
    if variant not in row["median_s"] or not accurate(row, variant):
        return f"fp32: {variant} missing or outside its error bound: NOT MET", False
    ratio = row["speedup_vs_reference"][variant]
    ok = ratio >= FP32_RATIO
    return (f"fp32: {variant} {ratio:.2f}x the reference (target {FP32_RATIO:g}x): "
            f"{'met' if ok else 'NOT MET'}"), ok


def memory_lines(row):
    ratios = row["memory_ratio"]
    if ratios is None:
        return ["peak memory: not measured (no reference peak): NOT MET"], False
    fused = sorted(v for v in ratios if precision_of(v) is not None)
    over = [v for v in fused if ratios[v] > MEMORY_RATIO]
    reference_mib = row["peak_memory_bytes"]["reference"] / 2**20
    lines = [f"peak memory: reference {reference_mib:.0f} MiB; target at most {MEMORY_RATIO:g} of it"]
    for v in fused:
        lines.append(f"  {v} {row['peak_memory_bytes'][v] / 2**20:.0f} MiB ({ratios[v]:.2f}): "
                     f"{'NOT MET' if v in over else 'met'}")
    return lines, bool(fused) and not over


def report(results, case):
    """(lines, every target met) for the case of a bench_gpu.py results dict; None if it lacks it."""
    row = find_row(results, case)
    if row is None:
        return None
    device = results.get("machine", {}).get("device", "?")
    lines = [f"issue 14 targets, {case} on {device}:"]
    speed, speed_met = speed_lines(row)
    fp32, fp32_met = fp32_line(row)
    memory, memory_met = memory_lines(row)
    met = speed_met and fp32_met and memory_met
    lines += ["  " + line for line in speed + [fp32] + memory]
    lines.append(f"  targets: {'all met' if met else 'not all met'}")
    return lines, met


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a JSON file written by benchmarks/bench_gpu.py")
    parser.add_argument("--case", default="480x270x4", help="LR width x height x scale (default "
                        "480x270x4, the 1080p frame)")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    answer = report(results, args.case)
    if answer is None:
        print(f"{args.results} has no case {args.case}", file=sys.stderr)
        return 2
    lines, met = answer
    print("\n".join(lines))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
