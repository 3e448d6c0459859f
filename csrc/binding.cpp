// pybind11 binding of the CUDA kernels, compiled by the host C++ compiler (never by nvcc).
// Pointers arrive as integers (CuPy's .data.ptr, a stream's .ptr): the Python side owns memory.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cntk_kernels.cuh"

namespace py = pybind11;

namespace {

void pair_sums(int device, std::uintptr_t xa, std::uintptr_t qa, std::uintptr_t xb,
               std::uintptr_t qb, std::uintptr_t pair_a, std::uintptr_t pair_b, int64_t n_pairs,
               int C, int H, int W, int L, int filter_size, double w_first, double w, double b2,
               std::uintptr_t slot, int n_out, bool gap, bool fix, bool same_set, bool is_double,
               std::uintptr_t out, std::uintptr_t stream) {
  if (const char* why = cntk::unsupported_shape(H, W, filter_size, n_out)) throw std::invalid_argument(why);
  int err = cntk::set_device(device);
  if (err == 0) {
    py::gil_scoped_release release;
    err = cntk::launch_pair_sums(
        reinterpret_cast<const void*>(xa), reinterpret_cast<const void*>(qa),
        reinterpret_cast<const void*>(xb), reinterpret_cast<const void*>(qb),
        reinterpret_cast<const int32_t*>(pair_a), reinterpret_cast<const int32_t*>(pair_b),
        n_pairs, C, H, W, L, filter_size, cntk::LayerScalars{w_first, w, b2},
        reinterpret_cast<const int32_t*>(slot), n_out, gap, fix, same_set, is_double,
        reinterpret_cast<double*>(out), stream);
  }
  if (err != 0)
    throw std::runtime_error(std::string("CUDA error in cntk_engine pair_sums kernel launch: ") +
                             cntk::error_string(err));
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "cntk_engine CUDA kernels: fused per-offset CNTK readout sums (see csrc/cntk_kernels.cu)";
  m.def("pair_sums", &pair_sums, "Launch the fused kernel on raw device pointers (asynchronous).",
        py::arg("device"), py::arg("xa"), py::arg("qa"), py::arg("xb"), py::arg("qb"),
        py::arg("pair_a"), py::arg("pair_b"), py::arg("n_pairs"), py::arg("C"), py::arg("H"),
        py::arg("W"), py::arg("L"), py::arg("filter_size"), py::arg("w_first"), py::arg("w"),
        py::arg("b2"), py::arg("slot"), py::arg("n_out"), py::arg("gap"), py::arg("fix"),
        py::arg("same_set"), py::arg("is_double"), py::arg("out"), py::arg("stream"));
  m.def("unsupported_shape",
        [](int H, int W, int filter_size, int n_out) -> py::object {
          const char* why = cntk::unsupported_shape(H, W, filter_size, n_out);
          return why ? py::object(py::str(why)) : py::object(py::none());
        },
        "None if the fused kernels take this shape, else why not.");
  m.def("device_count", []() {
    int n = 0;
    int err = cntk::device_count(&n);
    if (err != 0) throw std::runtime_error(std::string("CUDA error: ") + cntk::error_string(err));
    return n;
  });
  m.def("synchronize", []() {
    int err;
    {
      py::gil_scoped_release release;
      err = cntk::synchronize();
    }
    if (err != 0) throw std::runtime_error(std::string("CUDA error: ") + cntk::error_string(err));
  });
  m.attr("cuda_architectures") = CNTK_CUDA_ARCHITECTURES;
}
