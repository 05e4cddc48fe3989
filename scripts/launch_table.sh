#!/usr/bin/env bash
# Launch one project's table cells (what projects/<table>/launch.sh runs): every cell writes to
# output/<table>/<scale>/<cell>/ and the comparison table goes to projects/<table>/results/<scale>.md.
# Usage: scripts/launch_table.sh TABLE [options of scripts/reproduce_table.py] [CELL ...] [-- KEY VALUE ...]
#   ... --num-gpus 8 [CELL ...]                                    one machine, 8 GPUs
#   ... --launcher machines --num-machines 2 --machine-rank R \
#       --dist-url tcp://<machine 0>:29500 --num-gpus 8           each of several machines
#   ... --launcher slurm --num-machines 4 --num-gpus 8            inside a SLURM allocation
#   ... --scale mini --jobs 2                                      the CPU mini cells
#   ... --dry-run ...                                              print the commands only
# Trailing "-- KEY VALUE ..." overrides every cell's config. Default scale: full. Python: $PYTHON,
# else the repository's .venv, else python on PATH.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
table="${1:?usage: scripts/launch_table.sh TABLE [options] [CELL ...]}"
shift
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python; fi
fi
cd "$repo"
exec "$PYTHON" scripts/reproduce_table.py --table "$table" --scale full "$@"
