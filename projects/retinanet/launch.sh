#!/usr/bin/env bash
# Launch this project's table cells; every cell writes to output/retinanet/<scale>/<cell>/ and the
# comparison table goes to results/<scale>.md. Options are scripts/reproduce_table.py's:
#   ./launch.sh --num-gpus 8 [CELL ...]                                    one machine, 8 GPUs
#   ./launch.sh --launcher machines --num-machines 2 --machine-rank R \
#               --dist-url tcp://<machine 0>:29500 --num-gpus 8           each of several machines
#   ./launch.sh --launcher slurm --num-machines 4 --num-gpus 8            inside a SLURM allocation
#   ./launch.sh --scale mini --jobs 2                                      the CPU mini cells
#   ./launch.sh --dry-run ...                                              print the commands only
# Trailing "-- KEY VALUE ..." overrides every cell's config. Default scale: full.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python; fi
fi
cd "$repo"
exec "$PYTHON" scripts/reproduce_table.py --table retinanet --scale full "$@"
