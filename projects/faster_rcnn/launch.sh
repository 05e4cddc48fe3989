#!/usr/bin/env bash
# This project's table cells, one after another or on a cluster: scripts/launch_table.sh documents
# the options (e.g. `./launch.sh --num-gpus 8 b512_agvm`, `./launch.sh --dry-run --launcher slurm ...`).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "$here/../../scripts/launch_table.sh" "$(basename "$here")" "$@"
