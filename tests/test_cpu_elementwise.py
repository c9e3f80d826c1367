"""The CPU backend's vectorised elementwise math (csrc/backend/cpu/vec_math.h): the gated GELU against
float64, its special values, and the same bits from every instruction-set copy.

gelu_mul(gate, up) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) * up in float32, with a 16-lane
tanhf (Cephes) in place of libm's. Error bound against the formula in float64: a few float32 roundings
of the result, plus the formula's own conditioning where 1 + tanh cancels (g < 0): an error of a few
ulp of 1 in tanh becomes 0.5 |g| times that in the result, whatever tanh is used (libm's included).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from dgemma_rt import _core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = np.sqrt(2.0 / np.pi)
EPS = 2.0**-24  # float32 unit roundoff
DENORM_MIN = 2.0**-149


def gelu64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return 0.5 * x * (1.0 + np.tanh(K * (x + 0.044715 * x**3)))


def bound(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    # 8 roundings of the result, 4 ulp of 1 in tanh (times 0.5 |x|), half a denormal
    return 8 * EPS * np.abs(ref) + 4 * EPS * 0.5 * np.abs(x.astype(np.float64)) + DENORM_MIN


def wide_inputs() -> np.ndarray:
    rng = np.random.default_rng(0)
    mag = np.logspace(-40, 5, 4001)  # denormals to far past tanh's saturation
    return np.concatenate([mag, -mag, rng.normal(0, 3, 20000), rng.uniform(-12, 12, 20000),
                           np.linspace(-0.8, 0.8, 3201)]).astype(np.float32)  # around tanh's 0.625 switch


def test_gelu_within_a_few_ulp_of_float64():
    x = wide_inputs()
    got = _core._testing.cpu_gelu_mul(x, np.ones_like(x))
    ref = gelu64(x)
    err = np.abs(got.astype(np.float64) - ref)
    bad = err > bound(x, ref)
    assert not bad.any(), list(zip(x[bad][:5], got[bad][:5], ref[bad][:5]))
    # away from the cancellation (x > -0.5), a relative bound of 1e-6
    pos = (x > -0.5) & (np.abs(ref) > 1e-30)
    assert (err[pos] / np.abs(ref[pos])).max() < 1e-6


def test_gelu_no_worse_than_libm():
    """The scalar formula with libm's tanhf (numpy float32 here) has the same error scale."""
    x = wide_inputs()
    x = x[np.isfinite(gelu64(x))]
    ref = gelu64(x)
    got = _core._testing.cpu_gelu_mul(x, np.ones_like(x)).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        one, half, k, c = np.float32(1), np.float32(0.5), np.float32(K), np.float32(0.044715)
        scalar = (half * x * (one + np.tanh(k * (x + c * x * x * x)))).astype(np.float64)
    b = bound(x, ref)
    assert (np.abs(scalar - ref) / b).max() <= 1.0  # the bound is the formula's, not the vector tanh's
    assert (np.abs(got - ref) / b).max() <= 2 * max((np.abs(scalar - ref) / b).max(), 0.25)


def test_gelu_special_values():
    x = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, -20.0, -1e3, -1e30, -3.4e38, 20.0, 1e3, 1e30, 3.4e38,
                  1e-45, -1e-45, 1e-38, -1e-38], dtype=np.float32)
    got = _core._testing.cpu_gelu_mul(x, np.ones_like(x))
    assert got[0] == np.inf  # 0.5 inf (1 + 1)
    assert np.isnan(got[1])  # 0.5 (-inf) (1 - 1) = -inf * 0, as the scalar formula with libm's tanhf
    assert np.isnan(got[2])
    assert got[3] == 0 and not np.signbit(got[3])
    assert got[4] == 0 and np.signbit(got[4])
    for v in got[5:9]:  # tanh = -1 exactly: x * 0
        assert v == 0 and np.signbit(v)
    np.testing.assert_array_equal(got[9:13], x[9:13])  # tanh = 1 exactly: x
    ref = gelu64(x[13:])
    assert (np.abs(got[13:] - ref) <= bound(x[13:], ref)).all()


@pytest.mark.parametrize("n", [1, 15, 16, 17, 333, 70001])
def test_gelu_mul_elementwise(n):
    """Bits independent of length, tail, chunking and threads; up multiplies after the GELU, rounded once."""
    rng = np.random.default_rng(n)
    g = rng.normal(0, 4, n).astype(np.float32)
    u = rng.normal(0, 2, n).astype(np.float32)
    got = _core._testing.cpu_gelu_mul(g, u)
    gelu = _core._testing.cpu_gelu_mul(g, np.ones_like(g))
    np.testing.assert_array_equal(got, gelu * u)
    pieces = np.concatenate([_core._testing.cpu_gelu_mul(g[i:i + 37], u[i:i + 37]) for i in range(0, n, 37)])
    np.testing.assert_array_equal(got, pieces)


def test_vec_math_includers_compile_without_fp_contraction():
    """Every source that includes vec_math.h gets -ffp-contract=off: an FMA in the x86-64-v3/v4 copies
    would round differently from the baseline copy."""
    includers = []
    for d, _, files in os.walk(os.path.join(ROOT, "csrc")):
        for f in files:
            path = os.path.join(d, f)
            if f.endswith(".cpp") and '#include "backend/cpu/vec_math.h"' in open(path).read():
                includers.append(os.path.relpath(path, ROOT))
    assert includers
    cmake = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    m = re.search(r"set_source_files_properties\(([^)]*)PROPERTIES COMPILE_OPTIONS -ffp-contract=off\)", cmake)
    assert m, "CMakeLists.txt no longer compiles any source with -ffp-contract=off"
    assert set(includers) <= set(m.group(1).split()), includers


# The production code's bodies, compiled once per DG_CPU_CLONES target with the flags CMakeLists.txt
# gives their sources; every lane of a stride through all 2^32 float bit patterns (NaN, inf, denormals
# included) must give the same bits (any NaN for a NaN).
_ISA_DRIVER = r"""
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>
#include "backend/cpu/vec_math.h"
using namespace dgemma::cpu::vec;
#define COPY(name, attrs)                                                                           \
  attrs void name(const float* g, const float* u, float* o, float* s, size_t n) { \
    map16(g, u, o, n, [](v16f a, v16f b) { return vgelu_tanh(a) * b; });                             \
    map16(g, s, n, [](v16f v) { return vtanh(v / 30.0f) * 30.0f; });                                 \
  }
COPY(run_v4, __attribute__((target("arch=x86-64-v4"))))
COPY(run_v3, __attribute__((target("arch=x86-64-v3"))))
COPY(run_base, )
static unsigned bits(float f) { unsigned b; std::memcpy(&b, &f, 4); return b; }
int main() {
  __builtin_cpu_init();
  const bool v4 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  std::vector<float> g, u;
  for (unsigned long b = 0; b < (1ul << 32); b += 2053) {
    float f; unsigned w = static_cast<unsigned>(b); std::memcpy(&f, &w, 4);
    g.push_back(f);
    u.push_back(static_cast<float>(g.size() % 7) - 3.0f);
  }
  const size_t n = g.size() - 5;  // a tail
  std::vector<float> o[3], s[3];
  for (auto& v : o) v.assign(n, 0);
  for (auto& v : s) v.assign(n, 0);
  run_base(g.data(), u.data(), o[0].data(), s[0].data(), n);
  if (v3) run_v3(g.data(), u.data(), o[1].data(), s[1].data(), n);
  if (v4) run_v4(g.data(), u.data(), o[2].data(), s[2].data(), n);
  long bad = 0;
  for (int c = 1; c < 3; ++c) {
    if ((c == 1 && !v3) || (c == 2 && !v4)) continue;
    for (size_t i = 0; i < n; ++i)
      for (const auto* r : {&o, &s}) {
        const float a = (*r)[0][i], b = (*r)[c][i];
        if (!(std::isnan(a) && std::isnan(b)) && bits(a) != bits(b) && bad++ < 5)
          std::printf("copy %d: x=%a base=%a got=%a\n", c, g[i], a, b);
      }
  }
  std::printf("checked %zu values, copies:%s%s, mismatches %ld\n", n, v3 ? " v3" : "", v4 ? " v4" : "", bad);
  return bad != 0;
}
"""


def test_instruction_set_copies_give_the_same_bits(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx or "clang" in os.path.basename(cxx):
        pytest.skip("needs GCC (target attributes as DG_CPU_CLONES uses them)")
    header = os.path.join(ROOT, "csrc", "backend", "cpu", "vec_math.h")
    if not os.path.exists(header):
        pytest.skip("no source tree")
    if os.uname().machine != "x86_64":
        pytest.skip("x86-64 copies only")
    src, exe = tmp_path / "isa.cpp", tmp_path / "isa"
    src.write_text(_ISA_DRIVER)
    p = subprocess.run([cxx, "-std=c++17", "-O3", "-ffp-contract=off", "-I", os.path.join(ROOT, "csrc"), str(src),
                        "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout
    if "v3" not in r.stdout:
        pytest.skip(f"this CPU has no AVX2/FMA copy to compare: {r.stdout}")
