# Prism: one binary (build/prism), one test binary (build/prism_tests).
# The CPU backend is always built; the CUDA backend whenever nvcc is found
# under CUDA_HOME. MPI (through mpicxx), NCCL (under NCCL_HOME, with CUDA) and
# HDF5 are used when present.
# cuBLAS comes from CUBLAS_HOME (default CUDA_HOME; on a machine whose cuBLAS
# lives only in PyTorch's wheels: CUBLAS_HOME=.../site-packages/nvidia/cublas).

CUDA_HOME   ?= /usr/local/cuda
CUBLAS_HOME ?= $(CUDA_HOME)
NCCL_HOME   ?= $(CUDA_HOME)
PYTHON    ?= /usr/bin/python3
BUILD     ?= build

CXX      ?= g++
CXXFLAGS ?= -O3 -g
CXXFLAGS += -std=c++17 -fopenmp -Wall -Wextra -Wno-unused-parameter -I. -MMD -MP
LDLIBS   += -fopenmp -lpthread

# A machine that cannot install the Debian packages (the GPU machine reaches no
# registry) gets cxxopts, nlohmann/json and GoogleTest from a folder carried
# there: THIRD_PARTY/include and THIRD_PARTY/lib/libgtest.a (`make third_party`
# fills build/third_party from this machine's packages).
ifneq ($(THIRD_PARTY),)
  CXXFLAGS += -isystem $(THIRD_PARTY)/include
  LDLIBS   += -L$(THIRD_PARTY)/lib
endif

NVCC := $(wildcard $(CUDA_HOME)/bin/nvcc)
ifneq ($(NVCC),)
  WITH_CUDA := 1
  CUDA_ARCH ?= -gencode arch=compute_90,code=sm_90
  NVCCFLAGS ?= -O3 -g -lineinfo
  NVCCFLAGS += -std=c++17 $(CUDA_ARCH) -I. -I$(CUDA_HOME)/include -MMD -MP \
               -Xcompiler -Wall,-Wextra,-Wno-unused-parameter
  CXXFLAGS  += -DPRISM_CUDA -I$(CUDA_HOME)/include
  CUDA_LIBDIR := $(firstword $(wildcard $(CUDA_HOME)/lib64 $(CUDA_HOME)/lib))
  LDLIBS    += -L$(CUDA_LIBDIR) -Wl,-rpath,$(CUDA_LIBDIR) -lcudart
  # cuBLAS: wheels ship only versioned libraries (libcublas.so.12), so the
  # libraries are linked by path, with an rpath to their folder. Without it
  # the CUDA linear ops are built to throw "no cuBLAS" and the rest works.
  ifeq ($(wildcard $(CUBLAS_HOME)/include/cublas_v2.h),)
    # not in the toolkit: try the wheels of the python3 on PATH (nvidia/cublas, nvidia/cu13)
    PIP_NVIDIA  := $(shell python3 -c "import nvidia; print(' '.join(nvidia.__path__))" 2>/dev/null)
    CUBLAS_HOME := $(firstword $(foreach d,$(PIP_NVIDIA),$(foreach s,cublas cu13 cu12,$(if $(wildcard $(d)/$(s)/include/cublas_v2.h),$(d)/$(s)))) $(CUBLAS_HOME))
  endif
  CUBLAS_LIBDIR := $(firstword $(foreach d,$(CUBLAS_HOME)/lib64 $(CUBLAS_HOME)/lib,$(if $(wildcard $(d)/libcublas.so*),$(d))))
  cublas_so = $(firstword $(wildcard $(CUBLAS_LIBDIR)/lib$(1).so) $(sort $(wildcard $(CUBLAS_LIBDIR)/lib$(1).so.[0-9]*)))
  CUBLAS_LIBS := $(if $(CUBLAS_LIBDIR),$(call cublas_so,cublas) $(call cublas_so,cublasLt))
  ifneq ($(and $(wildcard $(CUBLAS_HOME)/include/cublas_v2.h),$(CUBLAS_LIBS)),)
    NVCCFLAGS += -DPRISM_CUBLAS -I$(CUBLAS_HOME)/include
    LDLIBS    += $(CUBLAS_LIBS) -Wl,-rpath,$(CUBLAS_LIBDIR)
  else
    $(info Makefile: no cuBLAS under CUBLAS_HOME=$(CUBLAS_HOME): the CUDA linear ops will throw)
  endif
  # NCCL (the GPU ranks' all-reduce, engine/nccl.cpp) is optional: used when
  # nccl.h is under NCCL_HOME. Without it `--device cuda` runs one process per
  # job, and more ranks under mpirun are refused with one line.
  # Wheels (nvidia/nccl) ship only libnccl.so.2: the library is linked by path,
  # like cuBLAS. Its include folder goes first, so that a toolkit's own
  # nccl.h cannot pair another version's header with this library.
  NCCL_INC := $(firstword $(wildcard $(NCCL_HOME)/include/nccl.h))
  ifneq ($(NCCL_INC),)
    NCCL_LIBDIR := $(firstword $(foreach d,$(NCCL_HOME)/lib64 $(NCCL_HOME)/lib,$(if $(wildcard $(d)/libnccl.so*),$(d))))
    NCCL_LIB    := $(firstword $(wildcard $(NCCL_LIBDIR)/libnccl.so) $(sort $(wildcard $(NCCL_LIBDIR)/libnccl.so.[0-9]*)))
    ifneq ($(NCCL_LIB),)
      CXXFLAGS  := -DPRISM_NCCL -I$(NCCL_HOME)/include $(CXXFLAGS)
      NVCCFLAGS := -DPRISM_NCCL -I$(NCCL_HOME)/include $(NVCCFLAGS)
      LDLIBS    += $(NCCL_LIB) -Wl,-rpath,$(NCCL_LIBDIR)
    else
      $(info Makefile: nccl.h but no libnccl.so* under NCCL_HOME=$(NCCL_HOME): building without NCCL)
    endif
  endif
endif

# MPI (engine/comm.cpp: ranks under mpirun) is optional: Open MPI's mpicxx
# says where its headers and libraries are. Without it every run is a world
# of one.
MPICXX := $(shell command -v mpicxx 2>/dev/null)
ifneq ($(MPICXX),)
  MPI_CFLAGS := $(shell $(MPICXX) --showme:compile 2>/dev/null)
  MPI_LIBS   := $(filter-out -lmpi_cxx,$(shell $(MPICXX) --showme:link 2>/dev/null))
  ifneq ($(MPI_CFLAGS),)
    CXXFLAGS += -DPRISM_MPI $(MPI_CFLAGS)
    LDLIBS   += $(MPI_LIBS)
  endif
endif

# HDF5 (So2Sat converter) is optional: the GPU machine may lack it.
HDF5_INC := $(firstword $(wildcard /usr/include/hdf5/serial))
ifneq ($(HDF5_INC),)
  CXXFLAGS += -DPRISM_HDF5 -I$(HDF5_INC)
  LDLIBS   += -L/usr/lib/x86_64-linux-gnu/hdf5/serial -lhdf5
endif

# OpenMP threads that spin while waiting steal the cores they wait for when the
# machine is busy (a build beside the tests, the loader's readers): on 2 busy
# cores the tiny moevit step ran 2.25x slower with GCC's default policy than
# with threads that sleep. `make test` and `make run` use the latter unless
# the caller chose.
export OMP_WAIT_POLICY ?= passive

LIB_SRCS  := $(sort $(wildcard engine/*.cpp data/*.cpp bench/*.cpp kernels/*.cpp kernels/cpu/*.cpp))
CU_SRCS   := $(if $(WITH_CUDA),$(sort $(wildcard kernels/cuda/*.cu)))
TEST_SRCS := $(sort $(wildcard tests/*.cpp tests/emulated/*.cpp))
LIB_OBJS  := $(LIB_SRCS:%.cpp=$(BUILD)/obj/%.o) $(CU_SRCS:%.cu=$(BUILD)/obj/%.cu.o)
TEST_OBJS := $(TEST_SRCS:%.cpp=$(BUILD)/obj/%.o)

DEB_PACKAGES := libcxxopts-dev nlohmann-json3-dev libgtest-dev libopenmpi-dev openmpi-bin \
                libhdf5-dev python3-torch gnuplot-nox

.PHONY: all deps build test run profile clean third_party
all: deps build

# Installs the Debian packages that are missing (needs root and apt).
deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "make deps: installing$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
	    || { echo "make deps: apt-get failed for:$$missing"; exit 1; }; \
	fi

build: $(BUILD)/prism $(BUILD)/prism_tests $(BUILD)/comm_worker

$(BUILD)/libprism.a: $(LIB_OBJS)
	@mkdir -p $(dir $@)
	ar rcs $@ $^

$(BUILD)/prism: $(BUILD)/obj/apps/prism.o $(BUILD)/libprism.a
	$(CXX) -o $@ $^ $(LDLIBS)

$(BUILD)/prism_tests: $(TEST_OBJS) $(BUILD)/libprism.a
	$(CXX) -o $@ $^ -lgtest $(LDLIBS)

# The program tests/test_comm.cpp starts under `mpirun -np 2`.
$(BUILD)/comm_worker: $(BUILD)/obj/tests/workers/comm_worker.o $(BUILD)/libprism.a
	$(CXX) -o $@ $^ $(LDLIBS)

# The emulated engine: the whole engine built for `--device cuda` with the
# CUDA runtime, the kernels and cuBLAS replaced by their CPU models
# (tests/emulated_runtime.h, tests/emulator.h, tests/emulated_cublas.h), so
# that tests/test_cuda_model.cpp and test_nccl.cpp run the model's CUDA path
# (kernels/backend.h, the device arenas, the bf16 mode, NCCL data parallel) on
# a machine without a GPU. Built with or without nvcc. Its launchers are
# prism_tests' emulated objects (the cuda_ops/cuda_detail namespaces renamed
# there, so here too); device.cu and util.cu are compiled for it alone
# (tests/emulated_engine/).
EMU_CXXFLAGS := $(filter-out -DPRISM_CUDA -DPRISM_NCCL,$(CXXFLAGS)) -DPRISM_CUDA -DPRISM_EMULATED_ENGINE \
                -Dcuda_ops=cuda_ops_emulated -Dcuda_detail=cuda_detail_emulated
EMU_LDLIBS   := $(filter-out -lcudart $(CUBLAS_LIBS) $(NCCL_LIB),$(LDLIBS))
# With MPI, NCCL is emulated too (tests/emulated_nccl.h: MPI's collectives),
# and build/prism_emulated, the CLI on the emulated engine, runs the NCCL
# path under mpirun for tests/test_nccl.cpp.
EMU_NCCL     := $(if $(MPI_CFLAGS),tests/emulated_engine/nccl.cpp)
EMU_LIB_SRCS := $(if $(EMU_NCCL),$(filter-out engine/nccl.cpp,$(LIB_SRCS)),$(LIB_SRCS)) $(EMU_NCCL) \
                $(filter-out tests/emulated_engine/nccl.cpp,$(wildcard tests/emulated_engine/*.cpp))
EMU_LIB_OBJS := $(EMU_LIB_SRCS:%.cpp=$(BUILD)/emulated/%.o) \
                $(patsubst %.cpp,$(BUILD)/obj/%.o,$(filter-out tests/emulated/cuda_%,$(wildcard tests/emulated/*.cpp)))
EMU_TEST_OBJS := $(BUILD)/emulated/tests/test_cuda_model.o $(BUILD)/emulated/tests/test_nccl.o $(BUILD)/obj/tests/main.o

$(BUILD)/prism_emulated_tests: $(EMU_TEST_OBJS) $(EMU_LIB_OBJS) | $(BUILD)/prism_emulated
	$(CXX) -o $@ $^ -lgtest $(EMU_LDLIBS)

$(BUILD)/prism_emulated: $(BUILD)/emulated/apps/prism.o $(EMU_LIB_OBJS)
	$(CXX) -o $@ $^ $(EMU_LDLIBS)

$(BUILD)/emulated/%.o: %.cpp
	@mkdir -p $(dir $@)
	$(CXX) $(EMU_CXXFLAGS) -c $< -o $@

$(BUILD)/obj/%.o: %.cpp
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) -c $< -o $@

$(BUILD)/obj/%.cu.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@

# The emulated engine's tests first: prism_tests' closing line, the tally of
# the main suite, is the last one printed.
test: deps build $(BUILD)/prism_emulated_tests $(BUILD)/prism_emulated
	cd $(CURDIR) && $(BUILD)/prism_emulated_tests
	cd $(CURDIR) && PRISM_PYTHON=$(PYTHON) $(BUILD)/prism_tests

RUN_DIR := $(BUILD)/run
run: deps build
	$(BUILD)/prism synth --preset tiny --out $(RUN_DIR)/data --count 16384 --seed 1
	rm -rf $(RUN_DIR)/moevit  # a fresh run each time: prism train refuses an --out that holds one
	$(BUILD)/prism train --config configs/synth_tiny_moevit.json --device auto \
	  --set data.train='$(RUN_DIR)/data/train-*.shard' --set data.val='$(RUN_DIR)/data/val-*.shard' \
	  --out $(RUN_DIR)/moevit
	$(BUILD)/prism eval --checkpoint $(RUN_DIR)/moevit/model.safetensors --data '$(RUN_DIR)/data/val-*.shard' --device auto
	$(BUILD)/prism report $(RUN_DIR)/moevit
	@echo "make run: the report is in $(RUN_DIR)/moevit/report (summary.md and the PNG plots)"

# Nsight Systems timeline of training steps 20..30 of a short tiny run: only
# the steps between cudaProfilerStart/Stop (--profile-steps) are captured.
# Needs nsys (not run yet: nsys could not make a report on the lent GPU machines).
PROFILE_DIR := $(BUILD)/profile
profile: build
	@command -v nsys >/dev/null || { echo "make profile: nsys (Nsight Systems) is not on PATH"; exit 1; }
	$(BUILD)/prism synth --preset tiny --out $(PROFILE_DIR)/data --count 2048 --seed 1
	rm -rf $(PROFILE_DIR)/run
	nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop --trace=cuda,nvtx,osrt \
	  --force-overwrite=true -o $(PROFILE_DIR)/prism \
	  $(BUILD)/prism train --config configs/synth_tiny_moevit.json --device cuda --profile-steps 20:30 \
	  --set data.train='$(PROFILE_DIR)/data/train-*.shard' --set data.val= --set train.steps=40 \
	  --out $(PROFILE_DIR)/run
	@echo "make profile: wrote $(PROFILE_DIR)/prism.nsys-rep (nsys stats $(PROFILE_DIR)/prism.nsys-rep, or open it in Nsight Systems)"

# The headers and library a registry-less machine needs from here (see THIRD_PARTY).
third_party: deps
	rm -rf $(BUILD)/third_party && mkdir -p $(BUILD)/third_party/include $(BUILD)/third_party/lib
	cp -r /usr/include/cxxopts.hpp /usr/include/nlohmann /usr/include/gtest $(BUILD)/third_party/include/
	cp /usr/lib/x86_64-linux-gnu/libgtest.a $(BUILD)/third_party/lib/

clean:
	rm -rf $(BUILD)

-include $(shell find $(BUILD)/obj $(BUILD)/emulated -name '*.d' 2>/dev/null)
