"""Where the benchmarks put their results: benchmarks/results/<stem>_<YYYYMMDD>.json, or a path given
with --out."""

import json
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_results(result, stem, out=None):
    """Writes `result` as JSON and says where; returns the path."""
    out = out or os.path.join(ROOT, "benchmarks", "results", f"{stem}_{time.strftime('%Y%m%d')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {os.path.relpath(out, ROOT)}")
    return out
