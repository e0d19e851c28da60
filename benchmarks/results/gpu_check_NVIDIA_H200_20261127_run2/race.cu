// Does racecheck honour bar.arrive -> bar.sync ordering? mode 0: writers arrive, readers sync;
// 1: both sync; 2: no barrier (a real race, must be reported).
#include <cstdio>
#include <cstdlib>
__global__ void handover(float* out, int mode) {
  __shared__ float buf[128];
  int t = threadIdx.x;
  if (t < 128) {
    buf[t] = t * 2.0f;
    if (mode == 0) asm volatile("bar.arrive 1, 256;" ::: "memory");
    if (mode == 1) asm volatile("bar.sync 1, 256;" ::: "memory");
  } else {
    if (mode != 2) asm volatile("bar.sync 1, 256;" ::: "memory");
    out[t - 128] = buf[(t - 128 + 5) % 128];
  }
}
int main(int argc, char** argv) {
  int mode = atoi(argv[1]);
  float* out;
  cudaMalloc(&out, 128 * sizeof(float));
  handover<<<4, 256>>>(out, mode);
  cudaError_t e = cudaDeviceSynchronize();
  printf("mode %d: %s\n", mode, cudaGetErrorString(e));
  return 0;
}
