// engine/nccl.cpp built with NCCL for the emulated engine: its CUDA and NCCL
// calls go to tests/emulated_runtime.h and tests/emulated_nccl.h (MPI's
// collectives on host memory), so `mpirun -np 2 build/prism_emulated train
// --device cuda` takes the NCCL path without a GPU. Built only where MPI is.
#include "tests/emulated_runtime.h"
#include "tests/emulated_nccl.h"

#define PRISM_NCCL 1
#include "engine/nccl.cpp"
