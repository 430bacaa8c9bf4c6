# Sourced by the bench/gpu scripts on a lent GPU machine: `gpu_binaries LOGDIR`
# puts build/gpu/prism and build/gpu/prism_tests in place, and `gpu_libs` (which
# it calls) finds NCCL and cuBLAS there and puts them on LD_LIBRARY_PATH.
#
# A lease is 15 minutes with the machine's start, and a build there takes one of
# them, so `bash bench/gpu/bundle.sh` builds the two binaries on this machine
# first (no MPI or HDF5, which the GPU machine lacks) into build/gpu-bundle/bin,
# which a call carries. They are used when they were built from these very
# sources (a digest of them) and load there; otherwise, or with
# PRISM_GPU_BUILD=1, the tree is built there (carry build/third_party for
# that; BUILD_TIMEOUT seconds at most, 300 by default).

# A digest of what the binaries are built from; the same here and there.
source_digest() {
    find Makefile apps engine kernels data bench tests -type f \
        \( -name Makefile -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) \
        | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16
}

gpu_libs() {
    local nv; nv=$(python3 -c "import nvidia; print(nvidia.__path__[0])" 2>/dev/null)
    # NCCL: the toolkit's if it has one, else a wheel's (nvidia/nccl).
    if [ -f /usr/local/cuda/include/nccl.h ]; then NCCL_DIR=/usr/local/cuda
    else NCCL_DIR=$(dirname "$(dirname "$(find "$nv" -name nccl.h 2>/dev/null | head -1)")" 2>/dev/null); fi
    local dirs="" d
    for d in "$NCCL_DIR/lib" "$NCCL_DIR/lib64" /usr/local/cuda/lib64 "$nv/cublas/lib" "$nv/cu13/lib"; do
        [ -d "$d" ] && dirs="$dirs${dirs:+:}$d"
    done
    export NCCL_DIR LD_LIBRARY_PATH="$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

gpu_binaries() {  # LOGDIR
    local logs=$1 bundle=build/gpu-bundle/bin why=""
    gpu_libs
    mkdir -p build/gpu "$logs"
    if [ "${PRISM_GPU_BUILD:-0}" = 1 ]; then why="PRISM_GPU_BUILD=1"
    elif [ ! -f $bundle/SOURCES ]; then why="none carried (bash bench/gpu/bundle.sh; carry build/gpu-bundle/bin)"
    elif [ "$(source_digest)" != "$(cat $bundle/SOURCES)" ]; then why="carried ones built from other sources"
    elif ! $bundle/prism_tests --gtest_list_tests > "$logs/bundle-load.log" 2>&1 \
         || ! $bundle/prism --help > /dev/null 2>> "$logs/bundle-load.log"; then
        why="carried ones do not load here: $(grep -m1 -iE "error|not found" "$logs/bundle-load.log")"
    fi
    if [ -z "$why" ]; then
        cp $bundle/prism $bundle/prism_tests build/gpu/
        echo "binaries: carried, $(cat $bundle/INFO)"
        return 0
    fi
    echo "binaries: building here ($why)"
    local start; start=$(date +%s)
    timeout "${BUILD_TIMEOUT:-300}" make -j"$(nproc)" BUILD=build/gpu THIRD_PARTY=build/third_party \
        ${NCCL_DIR:+NCCL_HOME=$NCCL_DIR} \
        build/gpu/prism build/gpu/prism_tests > "$logs/build.log" 2>&1 \
        || { echo "build failed or timed out (BUILD_TIMEOUT)"; tail -30 "$logs/build.log"; return 1; }
    echo "built in $(( $(date +%s) - start )) s"; grep -i "makefile:" "$logs/build.log"
    return 0
}
