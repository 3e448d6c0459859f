// Host build of the kernels' per-entry ReLU step (relu_step.cuh), for tests/test_cuda.py: it is
// compiled by the host C++ compiler (g++ -std=c++17 -ffp-contract=off) and its output compared
// with NumPy.  Not part of the extension.
//
// stdin: one entry per line, "s th qx qz fx0 fx1 fz0 fz1 self": Sigma, Theta, the two images'
// diagonals q (what v3 reads), their factors (sqrt(q / 2 pi), 1 / sqrt(q)) (what v5 reads) and
// 1 for a self pair's offset-(0, 0) entry.  stdout: one line per entry, K and G of every variant
// in float and in double: "v3f.K v3f.G v3d.K v3d.G v5f.K v5f.G v5d.K v5d.G".
#include <cstdio>

#include "relu_step.cuh"

namespace {

template <typename T>
void run(double s, double th, double qx, double qz, double fx0, double fx1, double fz0,
         double fz1, bool self, double out[4]) {
  T k, g;
  cntk::Entry<3, T>::step(T(qx), T(qz), T(s), T(th), self, k, g);
  out[0] = k;
  out[1] = g;
  using D5 = typename cntk::Entry<5, T>::Diag;
  cntk::Entry<5, T>::step(D5{T(fx0), T(fx1)}, D5{T(fz0), T(fz1)}, T(s), T(th), self, k, g);
  out[2] = k;
  out[3] = g;
}

}  // namespace

int main() {
  double s, th, qx, qz, fx0, fx1, fz0, fz1;
  int self;
  while (std::scanf("%lf %lf %lf %lf %lf %lf %lf %lf %d", &s, &th, &qx, &qz, &fx0, &fx1, &fz0,
                    &fz1, &self) == 9) {
    double f[4], d[4];
    run<float>(s, th, qx, qz, fx0, fx1, fz0, fz1, self != 0, f);
    run<double>(s, th, qx, qz, fx0, fx1, fz0, fz1, self != 0, d);
    std::printf("%.17g %.17g %.17g %.17g %.17g %.17g %.17g %.17g\n", f[0], f[1], d[0], d[1], f[2],
                f[3], d[2], d[3]);
  }
  return 0;
}
