"""Regenerates the README's results tables: the official EDSR-baseline-LIIF weights under the mmedit
protocol on Set5 and Set14 at every scale of the model card, next to the card's numbers (mmediting's
retrained weights) and the difference; and the classic bicubic rows (MATLAB bicubic down and up, 8-bit
Y channel, shave = scale) next to the published ones. Writes benchmarks/results/eval_tables_<date>.json
with the per-image values.

    python benchmarks/reproduce_tables.py --data ../shared/data     # about 25 minutes on 2 CPU cores
"""

import argparse
import os
import sys
import time

import torch

import liif_cuda
from liif_cuda.evaluation import evaluate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also under python -P
from results_file import ROOT, result_header, write_results  # noqa: E402

SCALES = [2, 3, 4, 6, 12, 18, 24, 30]
# The model card (liif_edsr_norm_c64b16_g1_1000k_div2k, mmediting 0.x protocol).
CARD = {
    "Set5": {2: (35.7120, 0.9365), 3: (32.3655, 0.8913), 4: (30.2668, 0.8511), 6: (27.0907, 0.7775),
             12: (22.9046, 0.6255), 18: (20.8445, 0.5390), 24: (19.7305, 0.5033),
             30: (18.6646, 0.4818)},
    "Set14": {2: (31.6106, 0.8891), 3: (28.4605, 0.8039), 4: (26.8093, 0.7377),
              6: (24.7129, 0.6438), 12: (21.5378, 0.5088), 18: (20.0215, 0.4521),
              24: (19.0703, 0.4218), 30: (18.0210, 0.3905)},
}
BICUBIC = {"Set5": {2: 33.66, 3: 30.39, 4: 28.42}, "Set14": {2: 30.24, 3: 27.55, 4: 26.00}}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared", "data"))
    parser.add_argument("--model", default="edsr-baseline-liif")
    parser.add_argument("--device", default=None)
    parser.add_argument("--scales", default=",".join(map(str, SCALES)))
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()
    scales = [int(s) for s in args.scales.split(",")]
    folders = [os.path.join(args.data, d) for d in CARD]
    start = time.perf_counter()
    liif = evaluate(args.model, folders, scales, protocol="mmedit", device=args.device)
    bicubic = evaluate("bicubic", folders, [2, 3, 4], protocol="classic", resize="matlab")
    minutes = (time.perf_counter() - start) / 60

    print("| scale | Set5 card | Set5 ours | difference | Set14 card | Set14 ours | difference |")
    print("|---|---|---|---|---|---|---|")
    for s in scales:
        cells = []
        for d in CARD:
            cp, cs = CARD[d][s]
            r = liif[d][str(s)]
            cells += [f"{cp:.4f} / {cs:.4f}", f"{r['psnr']:.4f} / {r['ssim']:.4f}",
                      f"{r['psnr'] - cp:+.4f} / {r['ssim'] - cs:+.4f}"]
        print(f"| x{s} | " + " | ".join(cells) + " |")
    print()
    print("| bicubic | Set5 published | Set5 ours | Set14 published | Set14 ours |")
    print("|---|---|---|---|---|")
    for s in (2, 3, 4):
        cells = []
        for d in CARD:
            cells += [f"{BICUBIC[d][s]:.2f}", f"{bicubic[d][str(s)]['psnr']:.4f}"]
        print(f"| x{s} | " + " | ".join(cells) + " |")
    print(f"\n{minutes:.1f} min, torch {torch.__version__}, liif_cuda {liif_cuda.__version__}")
    # Through results_file: a second run of the day gets _run2 instead of overwriting the first.
    write_results({**result_header("reproduce_tables (Set5, Set14: official weights under mmedit, "
                                   "bicubic under the classic protocol)", __file__, sys.argv[1:]),
                   "minutes": minutes, "card": CARD, "published_bicubic": BICUBIC,
                   "liif_mmedit": liif, "bicubic_classic": bicubic}, "eval_tables", args.out)


if __name__ == "__main__":
    main()
