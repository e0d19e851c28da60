#!/usr/bin/env bash
# Before a GPU run: copies what the GPU check reads from the shared data (Set5 and the official
# EDSR-baseline-LIIF weights, about 20 MB) from ../shared into ./shared, which .gitignore keeps out
# of git and the device tool sends with the checkout (the ../shared beside it does not travel).
#
#   bash tools/stage_shared_data.sh            # from ../shared
#   bash tools/stage_shared_data.sh DIR        # from DIR (with data/Set5 and weights/*.pth)
set -euo pipefail
# DIR is relative to where the script is run from, ../shared to the checkout.
SOURCE=${1:-}
case $SOURCE in ""|/*) ;; *) SOURCE=$PWD/$SOURCE ;; esac
cd "$(dirname "$0")/.."
SOURCE=${SOURCE:-../shared}
if [ ! -d "$SOURCE/data/Set5" ] || ! compgen -G "$SOURCE/weights/*.pth" > /dev/null; then
  echo "stage_shared_data.sh: error: $SOURCE must hold data/Set5 and weights/*.pth" >&2
  exit 2
fi
if [ "$(cd "$SOURCE" && pwd -P)" = "$(mkdir -p shared && cd shared && pwd -P)" ]; then
  echo "stage_shared_data.sh: error: $SOURCE is ./shared itself" >&2
  exit 2
fi
mkdir -p shared/data shared/weights
rm -rf shared/data/Set5
cp -r "$SOURCE/data/Set5" shared/data/
cp "$SOURCE"/weights/*.pth shared/weights/
echo "staged $(du -sh shared | cut -f1) in ./shared (Set5, $(ls shared/weights | tr '\n' ' '))"
