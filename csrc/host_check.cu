// Host build of the per-entry ReLU step (relu_step.cuh) for tests/test_cuda.py: no GPU needed.
//   nvcc -x cu -std=c++17 -Icsrc csrc/host_check.cu -o host_check && ./host_check < in > out
// Reads lines "s th nx ix nz iz lo" (decimal), writes "K G" per line for float and for double:
// "Kf Gf Kd Gd" with 17 significant digits.  The test compares them with NumPy in float64.
#include <cstdio>

#include "relu_step.cuh"

int main() {
  double v[7];
  while (std::scanf("%lf %lf %lf %lf %lf %lf %lf", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6]) == 7) {
    float kf, gf;
    double kd, gd;
    cntk::relu_step<float>((float)v[0], (float)v[1], (float)v[2], (float)v[3], (float)v[4],
                           (float)v[5], (float)v[6], kf, gf);
    cntk::relu_step<double>(v[0], v[1], v[2], v[3], v[4], v[5], v[6], kd, gd);
    std::printf("%.17g %.17g %.17g %.17g\n", (double)kf, (double)gf, kd, gd);
  }
  return 0;
}
