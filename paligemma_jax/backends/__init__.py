"""Speed paths for one backend, installed around the plain model with `nn.intercept_methods`.

`select` is asked once, by the pipeline, from where the parameters will live: it names the
weight layout (`layouts`) and the interceptor that go together.
- one CPU device: the out-major tree with XLA:CPU products and kernels (`cpu.py`);
- one accelerator: the out-major tree with plain products (`out_major.py`);
- a mesh: big_vision's layout split per layer, the plain model (`sharding.weight_stationary`
  constrains the decode step).
"""
import contextlib
import dataclasses
import logging
from typing import Callable

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Backend:
  name: str
  out_major: bool             # the layout: `layouts.unstacked(out_major=...)`
  install: Callable           # () -> context manager to trace the model in
  why: str

  def around(self, fn):
    """fn, traced and called under `install()`."""
    def run(*args, **kwargs):
      with self.install():
        return fn(*args, **kwargs)
    return run


def select(mesh=None, device=None, bfloat16: bool = False) -> Backend:
  """The speed path for parameters on `mesh` (a jax.sharding.Mesh) or on one `device`
  (default: jax's first). bfloat16: the weights are bfloat16 (the CPU kernels are built now,
  at load, not at the first trace). Logged once."""
  import jax
  if mesh is not None:
    backend = Backend("mesh", False, contextlib.nullcontext,
                      f"a {dict(mesh.shape)} mesh: big_vision's layout, plain model")
  else:
    device = device or jax.devices()[0]
    if device.platform == "cpu":
      from paligemma_jax.backends import cpu, cpu_kernels
      kernels = "float32"
      if bfloat16 and not cpu_kernels.available():
        kernels = "bfloat16 kernels unavailable"
      elif bfloat16:
        kernels = "bfloat16 kernels built" + (
            "" if cpu_kernels.gemm_is_fast() else "; prefill products through XLA (no AVX-512)")
      backend = Backend("cpu", True, cpu.install,
                        f"one CPU device: out-major layer weights, XLA:CPU products ({kernels})")
    else:
      from paligemma_jax.backends import out_major
      backend = Backend(device.platform, True, out_major.install,
                        f"one {device.platform} device: out-major layer weights, plain products")
  log.info("backend %s: %s", backend.name, backend.why)
  return backend
