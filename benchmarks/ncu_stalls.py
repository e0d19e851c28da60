"""Reads Nsight Compute's CSV output on stdin (benchmarks/ncu_profile.sh) and prints where a
kernel's warps wait, in a few lines:

    ncu -i REPORT --page raw --csv | python benchmarks/ncu_stalls.py raw
        the stall reasons (smsp__average_warp*_issue_stalled_*_per_issue_active), largest first
    ncu -i REPORT --page source --csv --print-source cuda | python benchmarks/ncu_stalls.py source
        the source lines (or SASS instructions) with the most warp stall samples, largest first

The CSV's columns differ between ncu versions: where the expected ones are missing, the first
lines are printed as they came, so that the log still shows what ncu said."""

import csv
import sys

TOP = 30


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def fallback(rows, why):
    print(f"({why}; the first lines as ncu wrote them)")
    for row in rows[:12]:
        print("  " + ",".join(row)[:300])


def stall_reasons(rows):
    """The raw page: a header row of metric names, a row of units, a row per kernel."""
    header = next((r for r in rows if any("issue_stalled" in c for c in r)), None)
    if header is None:
        return fallback(rows, "no stall metrics in the raw page")
    values = rows[rows.index(header) + 2:]  # after the units row
    if not values:
        return fallback(rows, "no kernel row in the raw page")
    stalls = []
    for i, name in enumerate(header):
        if "issue_stalled" in name and name.endswith("per_issue_active.ratio"):
            v = number(values[0][i]) if i < len(values[0]) else None
            if v is not None:
                stalls.append((v, name))
    for v, name in sorted(stalls, reverse=True)[:TOP]:
        if v > 0:
            print(f"  {v:8.3f}  {name}")


def source_lines(rows):
    """The source page: a header row with a source or instruction column and the stall samples."""
    header = next((r for r in rows if any("Warp Stall Sampling (All" in c for c in r)), None)
    if header is None:
        return fallback(rows, "no 'Warp Stall Sampling (All Samples)' column")
    samples = next(i for i, c in enumerate(header) if "Warp Stall Sampling (All" in c)
    text = next((i for i, c in enumerate(header) if c.strip() in ("Source", "Instruction")), None)
    place = next((i for i, c in enumerate(header) if c.strip() in ("#", "Line", "# Address",
                                                                    "Address")), None)
    body = [r for r in rows[rows.index(header) + 1:] if len(r) > samples]
    total = sum(number(r[samples]) or 0 for r in body)
    ranked = sorted(body, key=lambda r: number(r[samples]) or 0, reverse=True)[:TOP]
    print(f"  {total:.0f} samples in all")
    for r in ranked:
        n = number(r[samples]) or 0
        if n <= 0:
            break
        where = r[place] if place is not None else ""
        what = r[text].strip() if text is not None else ",".join(r)[:160]
        print(f"  {100 * n / total if total else 0:5.1f}%  {where:>8}  {what[:160]}")


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode not in ("raw", "source"):
        sys.exit("usage: ncu ... --csv | python benchmarks/ncu_stalls.py raw|source")
    rows = [r for r in csv.reader(sys.stdin) if r]
    if not rows:
        print("(ncu printed nothing)")
        return
    (stall_reasons if mode == "raw" else source_lines)(rows)


if __name__ == "__main__":
    main()
