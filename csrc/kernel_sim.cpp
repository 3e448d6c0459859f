// Host driver that runs the extension's kernels, from their CUDA source, in the host emulation
// of host_simt.h: tests/cuda_sim.py builds it with the host C++ compiler
// (g++ -std=c++17 -DCNTK_HOST_SIM -ffp-contract=off) and checks what it computes against the
// numba backend, without a GPU.  Not part of the extension.
//
// usage: kernel_sim PARAMS_FILE
// PARAMS_FILE: one "name value" per line for the scalar fields of cntk::PairSumsParams (as
// binding.cpp names them, plus "kernel v3|v5", "dtype float32|float64" and for a stack
// "stages h,w,layers,pool;h,w,layers,pool;..."), and "array name path" for each pointer field:
// a raw file of the field's elements (T for xa da xb db, int32 for pair_a pair_b slot grids,
// float64 for grid_w readout_w, and for out, which is written); "schedule forward|warps_reversed|
// warps_in_order" picks the emulation's thread order (host_simt.h; default forward).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "stack_sums_kernel.cuh"

namespace {

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "kernel_sim: %s\n", what.c_str());
  std::exit(2);
}

std::vector<double> read_raw(const std::string& path) {  // double storage: 8-byte aligned
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) die("cannot open " + path);
  std::fseek(f, 0, SEEK_END);
  long n = std::ftell(f);
  std::fseek(f, 0, SEEK_SET);
  std::vector<double> buf((n + 7) / 8 + 1);
  if (n && std::fread(buf.data(), 1, n, f) != (size_t)n) die("cannot read " + path);
  std::fclose(f);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) die("usage: kernel_sim PARAMS_FILE");
  FILE* f = std::fopen(argv[1], "r");
  if (!f) die(std::string("cannot open ") + argv[1]);
  std::map<std::string, std::string> scalars;
  std::map<std::string, std::string> arrays;
  char a[256], b[4096], c[4096];
  char line[8192];
  while (std::fgets(line, sizeof line, f)) {
    int n = std::sscanf(line, "%255s %4095s %4095s", a, b, c);
    if (n == 3 && std::strcmp(a, "array") == 0) arrays[b] = c;
    else if (n == 2) scalars[a] = b;
    else if (n > 0) die(std::string("bad line: ") + line);
  }
  std::fclose(f);
  auto num = [&](const char* key, double dflt) {
    auto it = scalars.find(key);
    return it == scalars.end() ? dflt : std::stod(it->second);
  };
  std::map<std::string, std::vector<double>> data;
  for (auto& kv : arrays)
    if (kv.first != "out") data[kv.first] = read_raw(kv.second);
  auto ptr = [&](const char* key) -> void* {
    auto it = data.find(key);
    return it == data.end() ? nullptr : it->second.data();
  };

  cntk::PairSumsParams p;
  p.xa = ptr("xa");
  p.da = ptr("da");
  p.xb = ptr("xb");
  p.db = ptr("db");
  p.pair_a = static_cast<const int32_t*>(ptr("pair_a"));
  p.pair_b = static_cast<const int32_t*>(ptr("pair_b"));
  p.slot = static_cast<const int32_t*>(ptr("slot"));
  p.grids = static_cast<const int32_t*>(ptr("grids"));
  p.grid_w = static_cast<const double*>(ptr("grid_w"));
  p.n_pairs = (int64_t)num("n_pairs", 0);
  p.C = (int)num("C", 0);
  p.H = (int)num("H", 0);
  p.W = (int)num("W", 0);
  p.L = (int)num("L", 0);
  p.filter_size = (int)num("filter_size", 0);
  p.n_out = (int)num("n_out", 0);
  p.w_first = num("w_first", 0);
  p.w = num("w", 0);
  p.b2 = num("b2", 0);
  p.gap = num("gap", 1) != 0;
  p.n_grids = (int)num("n_grids", 0);
  p.fix = num("fix", 0) != 0;
  p.same_set = num("same_set", 0) != 0;
  p.readout_w = static_cast<const double*>(ptr("readout_w"));
  p.readout_scale = num("readout_scale", 1.0);
  p.stack_blocks_per_sm = (int)num("stack_blocks_per_sm", 0);
  if (scalars.count("stages")) {
    const char* t = scalars["stages"].c_str();
    int n = 0, used = 0;
    while (*t && n < cntk::kMaxStages &&
           std::sscanf(t, "%d,%d,%d,%d%n", &p.stage_h[n], &p.stage_w[n], &p.stage_layers[n],
                       &p.stage_pool[n], &used) == 4) {
      ++n;
      t += used;
      if (*t == ';') ++t;
    }
    if (*t) die("bad stages: " + scalars["stages"]);
    p.n_stages = n;
  }
  p.dtype = scalars["dtype"] == "float64" ? cntk::Dtype::float64 : cntk::Dtype::float32;
  std::vector<double> out((size_t)p.n_pairs * p.n_out * 2 + 1);
  p.out = out.data();

  const std::string schedule = scalars.count("schedule") ? scalars["schedule"] : "forward";
  if (schedule == "warps_reversed") simt::machine().schedule = simt::Schedule::warps_reversed;
  else if (schedule == "warps_in_order") simt::machine().schedule = simt::Schedule::warps_in_order;
  else if (schedule != "forward")
    die("unknown schedule " + schedule + " (forward, warps_reversed, warps_in_order)");

  const std::string kernel = scalars["kernel"];
  int err;
  const bool stack = p.n_stages > 0;
  if (kernel == "v3") err = stack ? cntk::detail::launch_stack_variant<3>(p) : cntk::detail::launch_variant<3>(p);
  else if (kernel == "v5") err = stack ? cntk::detail::launch_stack_variant<5>(p) : cntk::detail::launch_variant<5>(p);
  else if (kernel == "v6") err = stack ? cntk::detail::launch_stack_variant<6>(p) : cntk::detail::launch_variant<6>(p);
  else if (kernel == "v7") err = stack ? cntk::detail::launch_stack_variant<7>(p) : cntk::detail::launch_variant<7>(p);
  else if (kernel == "v8") err = stack ? cntk::detail::launch_stack_variant<8>(p) : cntk::detail::launch_variant<8>(p);
  else die("unknown kernel " + kernel);
  if (err) die("launch failed");

  auto it = arrays.find("out");
  if (it == arrays.end()) die("no output array");
  FILE* o = std::fopen(it->second.c_str(), "wb");
  if (!o) die("cannot write " + it->second);
  std::fwrite(out.data(), sizeof(double), (size_t)p.n_pairs * p.n_out * 2, o);
  std::fclose(o);
  return 0;
}
