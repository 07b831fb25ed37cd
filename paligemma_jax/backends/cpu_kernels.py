"""bfloat16 weights on the CPU: `cpu_kernels.cc`'s XLA FFI targets.

XLA's CPU backend has no bfloat16 arithmetic on most x86 CPUs: it widens a bfloat16 weight
to float32 in a memory pass of its own before the dot (or hoists that out of the decode
loop and keeps float32 copies), so bfloat16 decoding reads more bytes than float32. `matvec`
widens in registers and reads each weight once; `gemm` does the prefill's products without
float32 copies of the weights. `rows` looks up embedding rows, which XLA
does by widening the whole table first, again hoisted out of the decode loop: ~0.35 s per
decode call for a 257k x 1024 table here.

The kernel is compiled on first use with the machine's C++ compiler (`$CXX`, else `g++`)
against the FFI headers jaxlib ships, and cached by source, compiler, jax version and CPU in
`$PALIGEMMA_JAX_CACHE` (default `~/.cache/paligemma_jax`). Without a compiler, or with
`PALIGEMMA_JAX_CPU_MATVEC=0`, `available()` is False and callers use XLA's dot.
"""
import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp

TARGET = "paligemma_bf16_matvec"
GEMM_TARGET = "paligemma_bf16_gemm"
ROWS_TARGET = "paligemma_bf16_rows"
SOURCE = pathlib.Path(__file__).with_name("cpu_kernels.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")

log = logging.getLogger(__name__)


def _cpu_signature() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
  except OSError:
    return platform.processor()


def _build(cache_dir: pathlib.Path) -> pathlib.Path:
  """Compiles the kernel into cache_dir unless built already; returns the library path."""
  cxx = os.environ.get("CXX", "g++")
  if shutil.which(cxx) is None:
    raise RuntimeError(f"no C++ compiler {cxx!r} on PATH (set $CXX)")
  key = hashlib.sha256("\0".join([SOURCE.read_text(), cxx, *FLAGS, jax.__version__,
                                  _cpu_signature()]).encode()).hexdigest()[:16]
  lib = cache_dir / f"cpu_kernels-{key}.so"
  if lib.exists():
    return lib
  cache_dir.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
  os.close(fd)
  cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
  log.info("building the bfloat16 CPU kernel once: %s", " ".join(cmd))
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode != 0:
    os.unlink(tmp)
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
  os.replace(tmp, lib)  # atomic: a process building beside us never loads half a file
  return lib


@functools.lru_cache(maxsize=None)
def gemm_is_fast() -> bool:
  """Whether `gemm` beats XLA's widen-then-dot here: its register blocking (24 accumulators
  of 16 lanes) is made for AVX-512. Measured on 272 x 1024 x 8192: with AVX-512, 0.63-0.89x
  XLA's time (session 7); on an AVX2-only AMD EPYC, 4 GFLOP/s against XLA's 123 (session 8)."""
  return " avx512f " in f" {_cpu_signature()} ".replace("\n", " ")


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """Whether the kernel is built and registered (once per process; logs why not)."""
  if os.environ.get("PALIGEMMA_JAX_CPU_MATVEC", "1") == "0":
    return False
  cache_dir = pathlib.Path(os.environ.get("PALIGEMMA_JAX_CACHE",
                                          pathlib.Path.home() / ".cache" / "paligemma_jax"))
  try:
    lib = ctypes.cdll.LoadLibrary(str(_build(cache_dir)))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.PaligemmaBf16Matvec),
                                platform="cpu")
    jax.ffi.register_ffi_target(GEMM_TARGET, jax.ffi.pycapsule(lib.PaligemmaBf16Gemm),
                                platform="cpu")
    jax.ffi.register_ffi_target(ROWS_TARGET, jax.ffi.pycapsule(lib.PaligemmaBf16Rows),
                                platform="cpu")
  except (RuntimeError, OSError, AttributeError) as e:
    log.warning("bfloat16 CPU kernel unavailable, bfloat16 decoding uses XLA's slower dot: %s",
                e)
    return False
  return True


def _product(target, name, x, w):
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1] or w.dtype != jnp.bfloat16:
    raise ValueError(f"{name}: expected x (X, I) and bfloat16 w (O, I), got x {x.shape} "
                     f"{x.dtype} and w {w.shape} {w.dtype}")
  out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
  return jax.ffi.ffi_call(target, out)(x.astype(jnp.float32), w)


def matvec(x, w):
  """x (X, I) float, w (O, I) bfloat16 -> float32 (X, O) = x @ w.T, accumulated in float32.

  For few rows (decoding): each weight is read from memory once for all X rows."""
  return _product(TARGET, "matvec", x, w)


def gemm(x, w):
  """As `matvec`, for many rows (prefill): blocks of w are widened once and meet every row."""
  return _product(GEMM_TARGET, "gemm", x, w)


def rows(table, index):
  """table (V, D) bfloat16, index int (any shape I) -> float32 (*I, D) = table[index].

  Indexed as jnp indexes: a negative index counts from the end, one out of range is clamped.
  """
  if table.ndim != 2 or table.dtype != jnp.bfloat16:
    raise ValueError(f"rows: expected a bfloat16 table (V, D), got {table.shape} {table.dtype}")
  flat = index.reshape(-1).astype(jnp.int32)
  flat = jnp.where(flat < 0, flat + table.shape[0], flat)
  out = jax.ShapeDtypeStruct((flat.shape[0], table.shape[1]), jnp.float32)
  return jax.ffi.ffi_call(ROWS_TARGET, out)(table, flat).reshape(*index.shape, table.shape[1])
