#!/usr/bin/env bash
# Builds, on this machine (not the GPU one), the CUDA binaries a GPU call runs:
# build/gpu-bundle/bin/{prism,prism_tests}, stripped (18 MB together, inside a
# call's 64 MiB), without MPI and HDF5 (the GPU machine has neither), with the
# digest of the sources they were built from (SOURCES) and where they came
# from (INFO). bench/gpu/binaries.sh uses them there when the digest matches
# and they load, and builds otherwise.
# Usage: bash bench/gpu/bundle.sh; then carry build/gpu-bundle/bin (and
#        build/third_party, for the build there should they not do).
set -euo pipefail
cd "$(dirname "$0")/../.."
source bench/gpu/binaries.sh
B=build/gpu-bundle
[ -x /usr/local/cuda/bin/nvcc ] || { echo "bundle.sh: no nvcc under /usr/local/cuda"; exit 1; }
# Host code without -g and device code with line info only: the sanitizers
# still name source lines, and the binaries stay small.
CXXFLAGS=-O3 NVCCFLAGS="-O3 -lineinfo" make -j"$(nproc)" BUILD=$B MPICXX= HDF5_INC= $B/prism $B/prism_tests
mkdir -p $B/bin
strip -o $B/bin/prism $B/prism
strip -o $B/bin/prism_tests $B/prism_tests
missing=$(ldd $B/bin/prism_tests | grep -E "mpi|hdf5" || true)
[ -z "$missing" ] || { echo "bundle.sh: the binaries need libraries the GPU machine lacks: $missing"; exit 1; }
source_digest > $B/bin/SOURCES
rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || rev="$rev+changes"
nvcc_version=$(/usr/local/cuda/bin/nvcc --version | grep -o "V[0-9][0-9.]*")
echo "built $(date -u +%Y-%m-%dT%H:%MZ) from $rev, nvcc $nvcc_version" > $B/bin/INFO
echo "bundle.sh: $(du -sh $B/bin | cut -f1) in $B/bin ($(cat $B/bin/INFO); sources $(cat $B/bin/SOURCES))"
