// pybind11 binding of the CUDA kernels, compiled by the host C++ compiler (never by nvcc).
// One launch = one cntk::PairSumsParams, built and checked here once (PairSumsParams(...), a
// std::invalid_argument -> ValueError naming what is wrong), then launched by pair_sums(params).
// Pointers arrive as integers (CuPy's .data.ptr, a stream's .ptr): the Python side owns memory.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <vector>

#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>

#include "cntk_kernels.cuh"

namespace py = pybind11;

namespace {

std::string variant_names() {
  std::string s;
  for (int i = 0; i < cntk::kernel_variant_count(); ++i) {
    if (i) s += ", ";
    s += cntk::kernel_variant(i).name;
  }
  return s;
}

template <typename P>
P pointer(std::uintptr_t v) {
  return reinterpret_cast<P>(v);
}

bool aligned(const void* ptr, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(ptr) % bytes == 0;
}

std::string str(long long v) { return std::to_string(v); }

std::string hex(std::uintptr_t v) {
  char buf[2 + 2 * sizeof(v) + 1];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

// Why `p` cannot be launched (unsupported shape, bad sizes, a null or misaligned pointer, an
// unknown variant), or "" if it can; the values behind the pointers are not checked.
// Messages are built by concatenation, never with iostreams: an std::ostringstream in this
// extension crashed the process on a GPU machine's image (cause not pinned down;
// docs/cuda_kernels.md), and the nvcc-compiled side exchanges only C types with this file.
std::string check_pair_sums(const cntk::PairSumsParams& p) {
  if (p.variant < 0 || p.variant >= cntk::kernel_variant_count())
    return "kernel variant index " + str(p.variant) + " is out of range [0, " +
           str(cntk::kernel_variant_count()) + ")";
  if (p.dtype != cntk::Dtype::float32 && p.dtype != cntk::Dtype::float64)
    return "dtype must be float32 or float64";
  if (const char* shape = cntk::unsupported_shape(p.H, p.W, p.filter_size, p.n_out))
    return std::string(shape) + "; got H x W = " + str(p.H) + " x " + str(p.W) +
           ", filter_size = " + str(p.filter_size) + ", n_out = " + str(p.n_out);
  if (p.C < 1) return "C (channels) must be >= 1; got " + str(p.C);
  if (p.L < 1 || p.L < p.n_out)
    return "L (ReLU layers) must be >= 1 and >= n_out (each readout is at its own layer); got L = " +
           str(p.L) + ", n_out = " + str(p.n_out);
  if (p.n_pairs < 0 || p.n_pairs > 2147483647LL)
    return "n_pairs must be in [0, 2^31 - 1] (one block per pair in one launch); got " + str(p.n_pairs);
  if (p.n_grids < 0 || p.n_grids > p.H * p.W)
    return "n_grids (the packed grids of a listed readout, LAP) must be in [0, H * W = " +
           str(p.H * p.W) + "]; got " + str(p.n_grids);
  if (p.device < 0) return "device must be a CUDA device ordinal >= 0; got " + str(p.device);
  const bool stack = p.n_stages > 0;
  if (stack) {
    if (const char* why = cntk::unsupported_stack(p.n_stages, p.stage_h, p.stage_w,
                                                  p.stage_layers, p.stage_pool, p.filter_size))
      return std::string(why) + "; got " + str(p.n_stages) + " stages";
    if (p.stage_h[0] != p.H || p.stage_w[0] != p.W)
      return "a stack's first stage is the images' size H x W = " + str(p.H) + " x " + str(p.W) +
             "; got " + str(p.stage_h[0]) + " x " + str(p.stage_w[0]);
    long long layers = 0;  // 64-bit: hand-built stage counts near INT_MAX must not wrap to L
    for (int s = 0; s < p.n_stages; ++s) layers += p.stage_layers[s];
    if (layers != p.L)
      return "a stack's stages hold L = " + str(p.L) + " conv layers in all; got " + str(layers);
    if (p.n_out != 1) return "a stack reads out one depth (n_out = 1); got " + str(p.n_out);
    if (p.stack_blocks_per_sm < 0 || p.stack_blocks_per_sm > 2)
      return "stack_blocks_per_sm must be 0 (the default), 1 or 2; got " + str(p.stack_blocks_per_sm);
    if (p.stack_blocks_per_sm == 2 && (p.dtype != cntk::Dtype::float32 || p.H != 32 || p.W != 32))
      return "stack_blocks_per_sm = 2 (the two-block candidate) is compiled for 32 x 32 images in "
             "float32 only; got " + str(p.H) + " x " + str(p.W) + " in " +
             (p.dtype == cntk::Dtype::float64 ? "float64" : "float32");
    const int last = p.stage_h[p.n_stages - 1] * p.stage_w[p.n_stages - 1];
    if (p.n_grids < 1 || p.n_grids > last)
      return "a stack reads out 1 to " + str(last) + " listed packed grids of its last stage; got n_grids = " +
             str(p.n_grids);
  }
  if (p.n_pairs == 0) return {};  // nothing is read or written
  const cntk::KernelVariant& variant = cntk::kernel_variant(p.variant);
  const std::size_t t = p.dtype == cntk::Dtype::float64 ? 8 : 4;
  const std::size_t d = t * variant.diag_width;
  struct Ptr {
    const char* name;
    const void* ptr;
    std::size_t align;
  };
  std::vector<Ptr> ptrs = {{"xa", p.xa, t},         {"da", p.da, d},
                           {"xb", p.xb, t},         {"db", p.db, d},
                           {"pair_a", p.pair_a, 4}, {"pair_b", p.pair_b, 4},
                           {"slot", p.slot, 4},     {"out", p.out, 8}};
  // the listed grids are read by a listed readout (LAP) and a stack's, the per-grid weights by
  // the LAP, a stack's per-entry weights when given (null: uniform)
  if (p.n_grids > 0) ptrs.push_back({"grids", p.grids, 4});
  if (p.n_grids > 0 && !stack) ptrs.push_back({"grid_w", p.grid_w, 8});
  for (const Ptr& q : ptrs) {
    if (q.ptr == nullptr)
      return std::string(q.name) + " is a null pointer (a device pointer is needed for " +
             str(p.n_pairs) + " pairs)";
    if (!aligned(q.ptr, q.align))
      return std::string(q.name) + " = " + hex(reinterpret_cast<std::uintptr_t>(q.ptr)) +
             " is not aligned to the " + str(static_cast<long long>(q.align)) +
             " bytes of its elements (kernel " + variant.name + ", " +
             (t == 8 ? "float64" : "float32") + ")";
  }
  if (stack && !aligned(p.readout_w, 8))
    return "readout_w = " + hex(reinterpret_cast<std::uintptr_t>(p.readout_w)) +
           " is not aligned to the 8 bytes of its float64 elements";
  return {};
}

cntk::PairSumsParams make_params(int device, std::uintptr_t stream, const std::string& kernel,
                                 const std::string& dtype, std::uintptr_t xa, std::uintptr_t da,
                                 std::uintptr_t xb, std::uintptr_t db, std::uintptr_t pair_a,
                                 std::uintptr_t pair_b, std::uintptr_t slot, std::uintptr_t out,
                                 int64_t n_pairs, int C, int H, int W, int L, int filter_size,
                                 int n_out, double w_first, double w, double b2, bool gap,
                                 bool fix, bool same_set, std::uintptr_t grids,
                                 std::uintptr_t grid_w, int n_grids,
                                 const std::vector<std::array<int, 4>>& stages,
                                 std::uintptr_t readout_w, double readout_scale,
                                 int stack_blocks_per_sm) {
  cntk::PairSumsParams p;
  p.variant = cntk::find_kernel_variant(kernel.c_str());
  if (p.variant < 0)
    throw std::invalid_argument("unknown CUDA kernel variant '" + kernel +
                                "'; compiled variants: " + variant_names());
  if (dtype == "float32") {
    p.dtype = cntk::Dtype::float32;
  } else if (dtype == "float64") {
    p.dtype = cntk::Dtype::float64;
  } else {
    throw std::invalid_argument("dtype must be 'float32' or 'float64'; got '" + dtype + "'");
  }
  p.device = device;
  p.stream = stream;
  p.xa = pointer<const void*>(xa);
  p.da = pointer<const void*>(da);
  p.xb = pointer<const void*>(xb);
  p.db = pointer<const void*>(db);
  p.pair_a = pointer<const int32_t*>(pair_a);
  p.pair_b = pointer<const int32_t*>(pair_b);
  p.slot = pointer<const int32_t*>(slot);
  p.out = pointer<double*>(out);
  p.n_pairs = n_pairs;
  p.C = C;
  p.H = H;
  p.W = W;
  p.L = L;
  p.filter_size = filter_size;
  p.n_out = n_out;
  p.w_first = w_first;
  p.w = w;
  p.b2 = b2;
  p.gap = gap;
  p.fix = fix;
  p.same_set = same_set;
  p.grids = pointer<const int32_t*>(grids);
  p.grid_w = pointer<const double*>(grid_w);
  p.n_grids = n_grids;
  if (stages.size() > (std::size_t)cntk::kMaxStages)
    throw std::invalid_argument("cntk_engine pair_sums: a stack of " + str((long long)stages.size()) +
                                " stages; the CUDA stack kernel takes 1 to " + str(cntk::kMaxStages));
  p.n_stages = (int)stages.size();
  for (int s = 0; s < p.n_stages; ++s) {
    p.stage_h[s] = stages[s][0];
    p.stage_w[s] = stages[s][1];
    p.stage_layers[s] = stages[s][2];
    p.stage_pool[s] = stages[s][3];
  }
  p.readout_w = pointer<const double*>(readout_w);
  p.readout_scale = readout_scale;
  p.stack_blocks_per_sm = stack_blocks_per_sm;
  const std::string why = check_pair_sums(p);
  if (!why.empty()) throw std::invalid_argument("cntk_engine pair_sums: " + why);
  return p;
}

void pair_sums(const cntk::PairSumsParams& p) {
  int err = cntk::set_device(p.device);
  if (err == 0) {
    py::gil_scoped_release release;
    err = cntk::launch_pair_sums(p);
  }
  if (err != 0)
    throw std::runtime_error(std::string("CUDA error in cntk_engine pair_sums kernel launch: ") +
                             cntk::error_string(err));
}

std::string repr(const cntk::PairSumsParams& p) {
  auto flag = [](bool b) { return b ? "1" : "0"; };
  return std::string("PairSumsParams(kernel='") + cntk::kernel_variant(p.variant).name +
         "', dtype='" + (p.dtype == cntk::Dtype::float64 ? "float64" : "float32") +
         "', n_pairs=" + str(p.n_pairs) + ", C=" + str(p.C) + ", H=" + str(p.H) +
         ", W=" + str(p.W) + ", L=" + str(p.L) + ", filter_size=" + str(p.filter_size) +
         ", n_out=" + str(p.n_out) + ", gap=" + flag(p.gap) + ", n_grids=" + str(p.n_grids) +
         ", n_stages=" + str(p.n_stages) +
         ", fix=" + flag(p.fix) +
         ", same_set=" + flag(p.same_set) + ", device=" + str(p.device) + ")";
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "cntk_engine CUDA kernels: fused per-offset CNTK readout sums (see csrc/pair_sums_kernel.cuh)";
  py::class_<cntk::PairSumsParams>(
      m, "PairSumsParams",
      "The parameters of one pair-kernel launch (csrc/cntk_kernels.cuh), checked when built: "
      "a ValueError names what the kernels cannot take.  Pointers are device addresses as ints.")
      .def(py::init(&make_params), py::kw_only(), py::arg("device"), py::arg("stream"),
           py::arg("kernel"), py::arg("dtype"), py::arg("xa"), py::arg("da"), py::arg("xb"),
           py::arg("db"), py::arg("pair_a"), py::arg("pair_b"), py::arg("slot"), py::arg("out"),
           py::arg("n_pairs"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("L"),
           py::arg("filter_size"), py::arg("n_out"), py::arg("w_first"), py::arg("w"),
           py::arg("b2"), py::arg("gap"), py::arg("fix"), py::arg("same_set"),
           py::arg("grids") = 0, py::arg("grid_w") = 0, py::arg("n_grids") = 0,
           py::arg("stages") = std::vector<std::array<int, 4>>(), py::arg("readout_w") = 0,
           py::arg("readout_scale") = 1.0, py::arg("stack_blocks_per_sm") = 0)
      .def_property_readonly("kernel",
                             [](const cntk::PairSumsParams& p) { return cntk::kernel_variant(p.variant).name; })
      .def_property_readonly("dtype",
                             [](const cntk::PairSumsParams& p) {
                               return p.dtype == cntk::Dtype::float64 ? "float64" : "float32";
                             })
      .def_readonly("n_pairs", &cntk::PairSumsParams::n_pairs)
      .def_readonly("C", &cntk::PairSumsParams::C)
      .def_readonly("H", &cntk::PairSumsParams::H)
      .def_readonly("W", &cntk::PairSumsParams::W)
      .def_readonly("L", &cntk::PairSumsParams::L)
      .def_readonly("filter_size", &cntk::PairSumsParams::filter_size)
      .def_readonly("n_out", &cntk::PairSumsParams::n_out)
      .def_readonly("w_first", &cntk::PairSumsParams::w_first)
      .def_readonly("w", &cntk::PairSumsParams::w)
      .def_readonly("b2", &cntk::PairSumsParams::b2)
      .def_readonly("gap", &cntk::PairSumsParams::gap)
      .def_readonly("n_grids", &cntk::PairSumsParams::n_grids)
      .def_readonly("n_stages", &cntk::PairSumsParams::n_stages)
      .def_readonly("readout_scale", &cntk::PairSumsParams::readout_scale)
      .def_readonly("stack_blocks_per_sm", &cntk::PairSumsParams::stack_blocks_per_sm)
      .def_readonly("fix", &cntk::PairSumsParams::fix)
      .def_readonly("same_set", &cntk::PairSumsParams::same_set)
      .def_readonly("device", &cntk::PairSumsParams::device)
      .def("__repr__", &repr);
  m.def("pair_sums", &pair_sums, "Launch the pair kernel for checked parameters (asynchronous, on their stream).",
        py::arg("params"));
  m.def("unsupported_shape",
        [](int H, int W, int filter_size, int n_out) -> py::object {
          const char* why = cntk::unsupported_shape(H, W, filter_size, n_out);
          return why ? py::object(py::str(why)) : py::object(py::none());
        },
        "None if the fused kernels take this shape, else why not.");
  m.def("unsupported_stack",
        [](const std::vector<std::array<int, 4>>& stages, int filter_size) -> py::object {
          int h[cntk::kMaxStages], w[cntk::kMaxStages], l[cntk::kMaxStages], pool[cntk::kMaxStages];
          const int n = (int)stages.size();
          for (int s = 0; s < n && s < cntk::kMaxStages; ++s) {
            h[s] = stages[s][0];
            w[s] = stages[s][1];
            l[s] = stages[s][2];
            pool[s] = stages[s][3];
          }
          const char* why = cntk::unsupported_stack(n, h, w, l, pool, filter_size);
          return why ? py::object(py::str(why)) : py::object(py::none());
        },
        "None if the stack kernel takes these stages ((height, width, conv layers, pool) each) "
        "with this filter size, else why not.",
        py::arg("stages"), py::arg("filter_size"));
  m.def("kernel_variants",
        []() {
          py::list out;
          for (int i = 0; i < cntk::kernel_variant_count(); ++i) {
            const cntk::KernelVariant& v = cntk::kernel_variant(i);
            py::dict d;
            d["name"] = v.name;
            d["description"] = v.description;
            d["diag"] = v.diag;
            d["gpu_measured"] = v.gpu_measured;
            d["base"] = v.base;
            py::list default_for;
            if (v.default_float32) default_for.append("float32");
            if (v.default_float64) default_for.append("float64");
            d["default_for"] = default_for;
            out.append(d);
          }
          return out;
        },
        "The compiled kernel variants: dicts with name, description, diag (the per-image "
        "diagonal layout it reads: 'q', 'factors' or 'sqrt'), gpu_measured, default_for (the dtypes it "
        "is the default for), base (the variant whose kernels it launches where it has none of its own: "
        "itself for most).");
  {
    py::dict defaults;
    for (int i = 0; i < cntk::kernel_variant_count(); ++i) {
      const cntk::KernelVariant& v = cntk::kernel_variant(i);
      if (v.default_float32) defaults["float32"] = v.name;
      if (v.default_float64) defaults["float64"] = v.name;
    }
    m.attr("default_kernels") = defaults;
  }
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
