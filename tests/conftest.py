"""Test setup: 8 forced CPU devices (set before jax is imported) for the sharded backend,
one persistent compilation cache for the whole run, and quick compilation.

The cache (JAX's own, keyed by the program, the jax version and the devices) is shared
by the test processes and the launch scripts they start, so a program that several
tests build (the default FedAvg round, a method's rounds on the same shapes) compiles
once per run; cached and freshly compiled programs compute the same numbers.

The suite is compile-bound (thousands of small programs), so its programs are compiled
with LLVM's optimization level 0: XLA's own graph passes (fusion, layout) still run and
the programs compute the same operations; measured on three compile-heavy test files,
295 s instead of 399 s. Float rounding may differ in the last bits, which every test's
tolerance allows (tests that compare runs bit for bit compare programs compiled alike).
"""
import atexit
import os
import shutil
import tempfile

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  # Set here in the first process, before the test processes start, which inherit it.
  _CACHE = tempfile.mkdtemp(prefix="fedjax_lab_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
