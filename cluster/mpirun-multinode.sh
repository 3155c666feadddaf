#!/bin/bash
# Start a kutta job on the nodes of an Open MPI hostfile, RANKS_PER_NODE ranks on each, every rank
# pinned to its own THREADS cores and running that many compute threads.
#
#   cluster/mpirun-multinode.sh HOSTFILE RANKS_PER_NODE -- train --config configs/x.toml --out runs/x
#   cluster/mpirun-multinode.sh HOSTFILE RANKS_PER_NODE -- train --resume runs/x
#
# Environment (optional):
#   KUTTA          the binary (default ./target/release/kutta as an absolute path; it must exist at
#                  that path on every node: build it with `cargo build --release --features mpi`)
#   THREADS        compute threads (and cores) per rank (default: this node's cores / RANKS_PER_NODE;
#                  the nodes are assumed alike)
#   MPIRUN         the mpirun to use (default mpirun)
#   MPIRUN_ARGS    extra mpirun options, word-split (e.g. "--mca btl_tcp_if_include eth0")
#
# The run folder (--out / --resume) must be on a file system every node sees. The script ends with
# mpirun's exit status: 0, 1 (a rank's error), 124 (a collective timed out), or mpirun's own code.
set -euo pipefail

usage="usage: $0 HOSTFILE RANKS_PER_NODE -- train ARGS..."
[[ $# -ge 3 && $3 == -- ]] || { echo "$usage" >&2; exit 2; }
hostfile=$1 per_node=$2
shift 3
[[ -f $hostfile ]] || { echo "error: no hostfile $hostfile" >&2; exit 2; }
[[ $per_node =~ ^[1-9][0-9]*$ ]] || { echo "error: RANKS_PER_NODE must be a positive integer" >&2; exit 2; }

kutta=${KUTTA:-$PWD/target/release/kutta}
[[ -x $kutta ]] || { echo "error: $kutta is not an executable; cargo build --release --features mpi" >&2; exit 2; }

# Nodes = non-blank, non-comment lines of the hostfile.
nodes=$(grep -cEv '^[[:space:]]*(#|$)' "$hostfile" || true)
[[ $nodes -ge 1 ]] || { echo "error: $hostfile lists no nodes" >&2; exit 2; }
np=$((nodes * per_node))
threads=${THREADS:-$(($(nproc --all) / per_node))}
((threads >= 1)) || threads=1

echo "mpirun-multinode: $nodes node(s) x $per_node ranks = $np ranks, $threads threads each" >&2
# ppr:N:node places N ranks per node; PE=T gives each rank T cores, and --bind-to core pins it there.
# -x exports the thread counts to the ranks on every node.
# shellcheck disable=SC2086
exec "${MPIRUN:-mpirun}" --hostfile "$hostfile" -np "$np" \
    --map-by "ppr:$per_node:node:PE=$threads" --bind-to core \
    -x "RAYON_NUM_THREADS=$threads" -x "OMP_NUM_THREADS=$threads" \
    ${MPIRUN_ARGS:-} "$kutta" "$@"
