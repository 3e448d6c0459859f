// Host build of the kernels' per-entry ReLU step (relu_step.cuh), for tests/test_cuda.py: it is
// compiled by the host C++ compiler (g++ -std=c++17 -ffp-contract=off) and its output compared
// with NumPy.  Not part of the extension.
//
// stdin: one entry per line, "s th qx qz fx0 fx1 fz0 fz1 ux uz self": Sigma, Theta, the two
// images' diagonals q (what v3 reads), their factors (sqrt(q / 2 pi), 1 / sqrt(q)) (what v5
// reads), sqrt(q) (what v6 reads) and 1 for a self pair's offset-(0, 0) entry.  stdout: one line
// per entry, K and G of every variant in float and in double:
// "v3f.K v3f.G v3d.K v3d.G v5f.K v5f.G v5d.K v5d.G v6f.K v6f.G v6d.K v6d.G".
#include <cstdio>

#include "relu_step.cuh"

namespace {

template <typename T>
void run(double s, double th, double qx, double qz, double fx0, double fx1, double fz0,
         double fz1, double ux, double uz, bool self, double out[6]) {
  T k, g;
  cntk::Entry<3, T>::step(T(qx), T(qz), T(s), T(th), self, k, g);
  out[0] = k;
  out[1] = g;
  using D5 = typename cntk::Entry<5, T>::Diag;
  cntk::Entry<5, T>::step(D5{T(fx0), T(fx1)}, D5{T(fz0), T(fz1)}, T(s), T(th), self, k, g);
  out[2] = k;
  out[3] = g;
  cntk::Entry<6, T>::step(T(ux), T(uz), T(s), T(th), self, k, g);
  out[4] = k;
  out[5] = g;
}

}  // namespace

int main() {
  double s, th, qx, qz, fx0, fx1, fz0, fz1, ux, uz;
  int self;
  while (std::scanf("%lf %lf %lf %lf %lf %lf %lf %lf %lf %lf %d", &s, &th, &qx, &qz, &fx0, &fx1,
                    &fz0, &fz1, &ux, &uz, &self) == 11) {
    double f[6], d[6];
    run<float>(s, th, qx, qz, fx0, fx1, fz0, fz1, ux, uz, self != 0, f);
    run<double>(s, th, qx, qz, fx0, fx1, fz0, fz1, ux, uz, self != 0, d);
    for (int v = 0; v < 3; ++v)
      std::printf("%.17g %.17g %.17g %.17g%s", f[2 * v], f[2 * v + 1], d[2 * v], d[2 * v + 1],
                  v < 2 ? " " : "\n");
  }
  return 0;
}
