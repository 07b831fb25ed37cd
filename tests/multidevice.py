"""Tests that need 8 CPU devices: XLA fixes the device count when JAX starts, so their
`check_*` functions run in one child pytest with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (`run_on_8_devices`), and the parent
reports each as `test_on_8_devices[name]` (`make_outer_test`). Used by test_sharding.py and
test_orbax.py.
"""
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from tests import bv_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INNER_ENV = "PALIGEMMA_TEST_8_DEVICES"
INNER = os.environ.get(INNER_ENV) == "1"


def run_on_8_devices(test_file: str, tmp_dir, checks) -> dict:
  """Runs `test_file`'s `checks` (check_* names) in a child pytest on 8 CPU devices.

  -> {check name: (outcome, message)}; outcome in passed / failed / skipped.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
  env = dict(os.environ, JAX_PLATFORMS="cpu", **{INNER_ENV: "1"},
             XLA_FLAGS=(flags + " --xla_force_host_platform_device_count=8").strip())
  report = os.path.join(str(tmp_dir), "inner.xml")
  r = subprocess.run([sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider",
                      "-k", " or ".join(sorted({"test_" + c.split("[")[0][len("check_"):]
                                                for c in checks})), f"--junitxml={report}",
                      f"--basetemp={os.path.join(str(tmp_dir), 'inner')}"],
                     env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
  if not os.path.exists(report):
    raise AssertionError(f"child pytest wrote no report (rc {r.returncode}):\n"
                         f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
  results = {}
  for case in ET.parse(report).getroot().iter("testcase"):
    name = re.sub(r"^test_", "check_", case.get("name"))
    outcome, message = "passed", ""
    for tag in ("failure", "error", "skipped"):
      node = case.find(tag)
      if node is not None:
        outcome = "skipped" if tag == "skipped" else "failed"
        message = (node.get("message") or "") + "\n" + (node.text or "")
    results[name] = (outcome, message[-6000:])
  return results


def export_checks(namespace: dict):
  """In the child: expose every check_* as test_* so pytest collects it (with its params)."""
  if INNER:
    for name in [n for n in namespace if n.startswith("check_")]:
      namespace["test_" + name[len("check_"):]] = namespace[name]


def report_ids(namespace: dict, params: dict = None) -> list:
  """Ids as the child's junit report names them: check_x, or check_x[param]."""
  out = []
  for name in [n for n in namespace if n.startswith("check_")]:
    out += [f"{name}[{p}]" for p in (params or {}).get(name, ())] or [name]
  return out


def make_outer_test(test_file: str, names: list):
  @pytest.mark.skipif(INNER, reason="runs the child")
  @pytest.mark.parametrize("name", names)
  def test_on_8_devices(name, request, tmp_path_factory):
    key = "_results_" + os.path.basename(test_file)
    if not hasattr(request.session, key):
      setattr(request.session, key,
              run_on_8_devices(test_file, tmp_path_factory.mktemp("d8"), names))
    results = getattr(request.session, key)
    outcome, message = results.get(name, ("missing", f"not run; ran: {sorted(results)}"))
    assert outcome == "passed", f"{name} on 8 CPU devices: {outcome}\n{message}"
  return test_on_8_devices


# A tiny PaliGemma 2 (softcaps, post-norms, GQA) whose heads, kv heads, widths and vocabulary
# split over 8 devices: N=8 and the vocabulary divide 8; K=4 divides the 2x4 model axis but not
# 1x8 (the cache and kv_einsum fall back to replication there). Widths are large enough that
# every per-layer weight and cache block has more elements than a step's logits for the batch,
# which makes the "no weights or cache move in the loop" check below meaningful.
MESH_SPEC = dict(bv_fixtures.SPECS["pg2_gqa"], image_size=56, vit_width=64, vit_heads=8,
                 vit_mlp=128, llm_width=128, llm_heads=8, llm_kv_heads=4, head_dim=16,
                 llm_mlp=256, vocab=1536)
