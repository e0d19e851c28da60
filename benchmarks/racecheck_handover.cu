// Does compute-sanitizer's racecheck accept a correct bar.arrive -> bar.sync hand-over shaped like
// the warp-specialised wgmma kernel's (liif_query_wgmma_ws_kernel.cuh: 256 consumer threads write
// a tile's predictions and arrive, 128 producer threads sync and read them)? Run 6 reported hazards
// on that hand-over; a bare 256-thread probe with immediate barrier ids was clean. Each mode adds
// one of the kernel's features; the last has no barrier, a real race that racecheck must report.
//   nvcc -arch=sm_90 -o racecheck_handover benchmarks/racecheck_handover.cu
//   compute-sanitizer --tool racecheck ./racecheck_handover MODE
// (benchmarks/gpu_check.sh runs every mode when racecheck reports the kernel.)
#include <cstdio>
#include <cstdlib>

constexpr int kThreads = 384;  // a producer warpgroup, then two consumer warpgroups

__device__ __forceinline__ void arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void sync(int id, int count) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
}

// mode 0: every consumer lane writes, barrier id 7 known at compile time (immediates in SASS);
// mode 1: the id from a kernel argument (registers, as the kernel's 7 + buffer);
// mode 2: mode 1, written by one lane in four after a shuffle reduction (as the last layer's fold);
// mode 3: mode 2 over two tiles per block, alternating buffers and barriers 7 and 8;
// mode 4: mode 2 after the kernel's barriers among subsets of the block (the consumers' ring
//         barrier 1 of 256 threads, each consumer warpgroup's barrier 3 or 4 of 128, the
//         producer's barrier 2 of 128), around writes of their own;
// mode 5: no barrier (a race).
__global__ void handover(float* out, int mode, int done_barrier) {
  __shared__ float predictions[2][256];
  const int t = threadIdx.x, lane = t % 32;
  __shared__ float scratch[kThreads];
  const int tiles = mode == 3 ? 2 : 1;
  if (mode == 4) {  // each warpgroup passes words around its own threads between the barriers
    const int base = t / 128 * 128;
    scratch[t] = t;
    if (t >= 128) {
      sync(1, 256);
    } else {
      sync(2, 128);
    }
    const float next = scratch[base + (t + 1) % 128];
    sync(t >= 128 ? 3 + (t - 128) / 128 : 2, 128);
    scratch[t] = next + 1.f;
  }
  for (int k = 0; k < tiles; ++k) {
    const int b = k % 2;
    const int id = mode == 0 ? 7 : done_barrier + b;
    if (t >= 128) {  // consumers
      const int row = t - 128;
      float sum = row * 0.5f + k;
      if (mode >= 2) {
        sum += __shfl_xor_sync(0xFFFFFFFFu, sum, 1);
        sum += __shfl_xor_sync(0xFFFFFFFFu, sum, 2);
        if (lane % 4 == 0) {
          for (int j = 0; j < 4; ++j) predictions[b][row + j] = sum + j;
        }
      } else {
        predictions[b][row] = sum;
      }
      if (mode == 0) {
        asm volatile("bar.arrive 7, 384;" ::: "memory");
      } else if (mode != 5) {
        arrive(id, kThreads);
      }
    } else {  // the producer
      if (mode == 0) {
        asm volatile("bar.sync 7, 384;" ::: "memory");
      } else if (mode != 5) {
        sync(id, kThreads);
      }
      out[(blockIdx.x * tiles + k) * 128 + t] =
          predictions[b][2 * t] + predictions[b][2 * t + 1] + (mode == 4 ? scratch[t] : 0.f);
    }
  }
}

int main(int argc, char** argv) {
  const int mode = argc > 1 ? std::atoi(argv[1]) : 0;
  const int blocks = 4;
  float* out = nullptr;
  cudaMalloc(&out, blocks * 2 * 128 * sizeof(float));
  handover<<<blocks, kThreads>>>(out, mode, 7);
  const cudaError_t e = cudaDeviceSynchronize();
  std::printf("racecheck_handover mode %d: %s\n", mode, cudaGetErrorString(e));
  cudaFree(out);
  return e == cudaSuccess ? 0 : 1;
}
