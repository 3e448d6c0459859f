// Host build of the kernels' per-entry ReLU step (relu_step.cuh), for tests/test_cuda.py: it is
// compiled by the host C++ compiler (g++ -std=c++17 -ffp-contract=off) and its output compared
// with NumPy.  Not part of the extension.
//
// stdin: one entry per line, "s th qx qz self": Sigma, Theta, the two images' diagonals q (what
// v3 reads) and 1 for a self pair's offset-(0, 0) entry.  stdout: one line per entry, K and G of
// every variant in float and in double: "v3f.K v3f.G v3d.K v3d.G".
#include <cstdio>

#include "relu_step.cuh"

namespace {

template <typename T>
void run(double s, double th, double qx, double qz, bool self, double out[2]) {
  T k, g;
  cntk::Entry<3, T>::step(T(qx), T(qz), T(s), T(th), self, k, g);
  out[0] = k;
  out[1] = g;
}

}  // namespace

int main() {
  double s, th, qx, qz;
  int self;
  while (std::scanf("%lf %lf %lf %lf %d", &s, &th, &qx, &qz, &self) == 5) {
    double f[2], d[2];
    run<float>(s, th, qx, qz, self != 0, f);
    run<double>(s, th, qx, qz, self != 0, d);
    std::printf("%.17g %.17g %.17g %.17g\n", f[0], f[1], d[0], d[1]);
  }
  return 0;
}
