"""Peak anonymous (not file-backed) resident memory of a load, sampled in a fresh process."""
import os
import subprocess
import sys
import textwrap

_START = """
import sys, threading, time
import numpy as np, jax, jax.numpy as jnp
{imports}

def anon():
  for line in open('/proc/self/status'):
    if line.startswith('RssAnon:'):
      return int(line.split()[1]) * 1024

jax.device_put(np.zeros(4)).block_until_ready()
base, peak, running = anon(), [0], [True]
def sample():
  while running[0]:
    peak[0] = max(peak[0], anon()); time.sleep(0.002)
t = threading.Thread(target=sample); t.start()
"""
_END = """
jax.block_until_ready(params)
running[0] = False; t.join()
print(max(peak[0], anon()) - base)
"""


def peak_anonymous_bytes(tmp_path, imports: str, load: str, *args) -> int:
  """Runs `load` (code that sets `params`, reading sys.argv[1:] = args) after `imports` and
  the baseline -> the peak RssAnon above that baseline, in bytes."""
  probe = os.path.join(str(tmp_path), "memprobe.py")
  with open(probe, "w") as f:
    f.write(_START.format(imports=textwrap.dedent(imports)) + textwrap.dedent(load) + _END)
  out = subprocess.run([sys.executable, probe, *map(str, args)], capture_output=True,
                       text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), check=True)
  return int(out.stdout.strip().splitlines()[-1])
