"""The trainer on a device mesh and on several processes trains as on one device.

Every run here is the same tiny transfer (tests/train_fixtures.py: 8 examples, batch 8, 4 Adam
steps at lr 1e-3 with a cosine decay, float32, checkpoints and the validation loss over 5 other
examples at steps 2 and 4). The reference runs
in this process on one device (no mesh); the others are `python -m paligemma_jax.train` children:

* on 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8) with --config.mesh=8x1
  and 4x2 (the latter with grad_accum_steps=2 and dropout 0.1): parameters and optimizer state
  split by sharding.py's rules, the batch over `data`;
* as two processes joined by jax.distributed (`--distributed`; CPU collectives: gloo, jax's
  default), 4 CPU devices each, --config.mesh=2x4 over the 8 devices of both (the data axis
  across the processes, the model axis within each). Both write one workdir (Orbax saves
  together; process 0 alone writes metrics.jsonl and final.npz); then, with the last checkpoint
  removed, the same two commands restore step 2 and train steps 3 and 4 again.

The loss, the gradient norm and the validation loss (gathered from every process by
sharding.to_host) of every step must equal the reference's to LOSS_RTOL (relative):
float32 reductions in another order differ by ~1e-6 here, while one wrong step (a batch row lost
or doubled, a dropout mask that depends on the layout, a parameter shard not updated) changes
the loss by far more. final.npz: for every array, |final - reference| <= PARAM_RTOL *
|reference - init| (L2 norms: the difference against what training moved it). Adam divides by
the gradient's size, so an element whose gradient is at rounding level moves by a rounding-
dependent fraction of lr (single elements differ by up to ~6e-4 for a total movement of ~2.5e-3),
hence no elementwise bound; ratios measured are <= ~6e-3, while a shard left without its update
(1/8 of an array or more) gives >= ~0.3. The ViT's key biases have no gradient at all in exact
arithmetic (a softmax ignores a shift shared by all keys): Adam moves every element by ~lr times
the sign of rounding noise, so they are only held to |difference| <= 2 * sum(lr) elementwise.

The children run concurrently (XLA's compilations are mostly single-threaded) with
--xla_backend_optimization_level=0 (LLVM's optimizations: a third of a child's time here; the
numbers stay float32's); the two-process runs share jax's persistent compilation cache, so the
resumed one does not compile the step again.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from tests import train_fixtures

LOSS_RTOL = 1e-4
PARAM_RTOL = 5e-2
ZERO_GRAD = re.compile(r"MultiHeadDotProductAttention_0/key/bias$")
TIMEOUT_S = 480  # for every child of a batch launched together, from its launch

MESHES = {  # test id -> (mesh, fields on top of the base run)
    "8x1": ("8x1", {}),
    "4x2_accum2_dropout": ("4x2", {"grad_accum_steps": 2, "dropout": 0.1}),
}
TWO_PROCESS_MESH, DEVICES_PER_PROCESS = "2x4", 4


def _env(devices: int, cache_dir=None) -> dict:
  """CPU only, `devices` devices per process; with `cache_dir`, jax's persistent compilation
  cache (the resumed two-process run reuses the first one's step)."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  flags += f" --xla_force_host_platform_device_count={devices}"
  flags += " --xla_backend_optimization_level=0"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _tail(text: str, n: int = 4000) -> str:
  return "\n".join(line for line in text.splitlines() if not line.startswith("[Gloo]"))[-n:]


class Job:
  """Child processes (one command per process) started together, logging to files."""

  def __init__(self, name: str, commands: list, env: dict, log_dir: str):
    self.name, self.procs, self.logs = name, [], []
    self.deadline = time.monotonic() + TIMEOUT_S
    for i, cmd in enumerate(commands):
      out = open(os.path.join(log_dir, f"{name}_{i}.out"), "w+")
      err = open(os.path.join(log_dir, f"{name}_{i}.err"), "w+")
      self.logs.append((out, err))
      self.procs.append(subprocess.Popen(cmd, cwd=train_fixtures.REPO, env=env, stdout=out,
                                         stderr=err, text=True))
    self.report = None

  def wait(self):
    """Waits for every process (killing all at the deadline); fails with each one's tails
    unless all exited 0."""
    if self.report is None:
      try:
        for p in self.procs:
          p.wait(timeout=max(1.0, self.deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        pass
      finally:
        self.kill()
      codes = [p.returncode for p in self.procs]
      lines = []
      for i, (out, err) in enumerate(self.logs):
        out.seek(0)
        err.seek(0)
        lines.append(f"--- {self.name} process {i}: rc {codes[i]} (-9: killed after "
                     f"{TIMEOUT_S} s); stdout:\n{_tail(out.read(), 1500)}\n--- stderr:\n"
                     f"{_tail(err.read())}")
        out.close()
        err.close()
      self.report = (codes, "\n".join(lines))
    codes, text = self.report
    assert codes == [0] * len(codes), f"{self.name} failed:\n{text}"

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _two_process_commands(workdir, fields: dict) -> list:
  port = _free_port()
  return [train_fixtures.train_command(
      workdir, fields, "--distributed", f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2", f"--process_id={i}") for i in range(2)]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
  """The run's settings (data, init and tokenizer written once for the module)."""
  folder = tmp_path_factory.mktemp("dist_data")
  val = train_fixtures.write_data(folder, 5, name="val.jsonl", seed=1)  # wraps around a batch
  fields = train_fixtures.settings(folder, tokenizer.path, n=8, batch_size=8, total_steps=4,
                                   val_data=val)
  if "eval_decode" in train_fixtures.config({}):
    fields["eval_decode"] = False  # the validation loss only (greedy answers: not tested here)
  return fields


@pytest.fixture(scope="module")
def children(base, tmp_path_factory):
  """Starts every mesh run and the two-process run at once -> {id: (Job, workdir)}."""
  root = tmp_path_factory.mktemp("children")
  jobs = {}
  for case, (mesh, extra) in MESHES.items():
    workdir = str(root / case)
    jobs[case] = (Job(case, [train_fixtures.train_command(
        workdir, {**base, **extra, "mesh": mesh})], _env(8), str(root)), workdir)
  workdir = str(root / "two_processes")
  jobs["two_processes"] = (Job("two_processes", _two_process_commands(
      workdir, {**base, "mesh": TWO_PROCESS_MESH}),
      _env(DEVICES_PER_PROCESS, root / "jax_cache"), str(root)), workdir)
  yield jobs
  for job, _ in jobs.values():
    job.kill()


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
  """reference(**fields) -> workdir of that run in this process on one CPU device (no mesh;
  CPU as the children, whatever this process's default backend is)."""
  from paligemma_jax.train.trainer import Trainer
  done = {}

  def get(**extra):
    key = tuple(sorted(extra.items()))
    if key not in done:
      workdir = str(tmp_path_factory.mktemp("reference"))
      precision = jax.config.jax_default_matmul_precision  # the trainer sets it globally
      try:
        with jax.default_device(jax.devices("cpu")[0]):
          Trainer(train_fixtures.config({**base, **extra}), workdir, progress=False).run()
      finally:
        jax.config.update("jax_default_matmul_precision", precision)
      done[key] = workdir
    return done[key]
  return get


def _metrics(workdir) -> list:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b) / np.abs(b)))


def _compare_params(workdir, ref_dir, init_path, lrs, what: str) -> float:
  """-> the largest |final - reference| / |reference - init| over the arrays."""
  a = np.load(os.path.join(workdir, "final.npz"))
  b = np.load(os.path.join(ref_dir, "final.npz"))
  init = np.load(init_path)
  assert sorted(a.keys()) == sorted(b.keys()) == sorted(init.keys())
  worst = 0.0
  for k in b.keys():
    assert a[k].shape == b[k].shape == init[k].shape and a[k].dtype == b[k].dtype, k
    if ZERO_GRAD.search(k):
      diff = float(np.max(np.abs(a[k] - b[k])))
      assert diff <= 2 * sum(lrs), f"{what}: final.npz {k} differs by up to {diff:.2e}"
      continue
    ratio = float(np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(b[k] - init[k]), 1e-12))
    assert ratio <= PARAM_RTOL, (f"{what}: final.npz {k}: |final - one device's| is "
                                 f"{ratio:.2e} of |one device's - init|")
    worst = max(worst, ratio)
  return worst


def _same_run(workdir, ref_dir, init_path, what: str):
  """Asserts that the curve and final.npz of `workdir` match `ref_dir`'s."""
  got, ref = _metrics(workdir), _metrics(ref_dir)
  assert [m["step"] for m in got] == [m["step"] for m in ref] == [1, 2, 3, 4], (got, ref)
  loss = _rel([m["loss"] for m in got], [m["loss"] for m in ref])
  grad = _rel([m["grad_norm"] for m in got], [m["grad_norm"] for m in ref])
  assert loss < LOSS_RTOL and grad < LOSS_RTOL, (
      f"{what}: max relative difference from one device: loss {loss:.2e}, grad_norm "
      f"{grad:.2e}\n{[m['loss'] for m in got]}\n{[m['loss'] for m in ref]}")
  np.testing.assert_allclose([m["lr"] for m in got], [m["lr"] for m in ref], rtol=1e-6)
  assert [m["step"] for m in got if "val_loss" in m] == [2, 4]
  val = _rel([m["val_loss"] for m in got if "val_loss" in m],
             [m["val_loss"] for m in ref if "val_loss" in m])
  assert val < LOSS_RTOL, f"{what}: validation loss differs by {val:.2e} (relative)"
  worst = _compare_params(workdir, ref_dir, init_path, [m["lr"] for m in ref], what)
  print(f"\n{what}: max relative difference from one device: loss {loss:.2e}, grad_norm "
        f"{grad:.2e}, val_loss {val:.2e}; final.npz: max |diff| / |moved| {worst:.2e}")


def _checkpoints(workdir) -> list:
  steps = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  for s in steps:  # committed, and no temporary directory left by any process
    assert os.path.exists(os.path.join(workdir, "checkpoints", s, "commit_success.txt")), s
  return steps


@pytest.mark.parametrize("case", list(MESHES))
def test_mesh_trains_as_one_device(case, base, children, reference):
  ref_dir = reference(**MESHES[case][1])
  job, workdir = children[case]
  job.wait()
  _same_run(workdir, ref_dir, base["init"], f"mesh {MESHES[case][0]} {MESHES[case][1]}")
  assert _checkpoints(workdir) == ["2", "4"]


def test_two_processes_train_as_one(base, children, reference):
  ref_dir = reference()
  job, workdir = children["two_processes"]
  job.wait()
  _same_run(workdir, ref_dir, base["init"], f"2 processes x {DEVICES_PER_PROCESS} devices, mesh "
            f"{TWO_PROCESS_MESH}")
  assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json", "final.npz",
                                         "metrics.jsonl"]
  assert _checkpoints(workdir) == ["2", "4"]


def test_two_processes_resume(children, base, tmp_path):
  """Both processes restore step 2 from the checkpoint they saved together; steps 3 and 4 come
  out as in the uninterrupted run, whose first two lines of metrics.jsonl are kept."""
  job, first = children["two_processes"]
  job.wait()
  workdir = str(tmp_path / "run")
  shutil.copytree(first, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  os.remove(os.path.join(workdir, "final.npz"))
  resumed = Job("resume", _two_process_commands(workdir, {**base, "mesh": TWO_PROCESS_MESH}),
                _env(DEVICES_PER_PROCESS, os.path.join(os.path.dirname(first), "jax_cache")),
                str(tmp_path))
  try:
    resumed.wait()
  finally:
    resumed.kill()
  with open(os.path.join(str(tmp_path), "resume_0.out")) as f:
    assert f"resuming {workdir} from step 2" in f.read()
  got, ref = _metrics(workdir), _metrics(first)
  assert [m["step"] for m in got] == [1, 2, 3, 4]
  assert got[:2] == ref[:2]  # the very lines (timings included): kept, not trained again
  rel = max(_rel([m[k] for m in got[2:] if k in m], [m[k] for m in ref[2:] if k in m])
            for k in ("loss", "grad_norm", "val_loss"))
  assert rel < LOSS_RTOL, (got, ref)
  worst = _compare_params(workdir, first, base["init"], [m["lr"] for m in ref], "resumed")
  print(f"\n2-process resume from step 2: steps 3-4 max relative difference (loss, grad_norm, "
        f"val_loss) {rel:.2e}; "
        f"final.npz: max |diff| / |moved| {worst:.2e}")
  assert _checkpoints(workdir) == ["2", "4"]


def test_micro_batch_not_divisible_by_the_data_axis_is_one_error_line(base, tmp_path):
  """batch 8 / grad_accum 2 = micro-batches of 4 cannot split over a data axis of 8: exit 2
  with one line naming both numbers, before anything is written or compiled."""
  workdir = tmp_path / "run"
  cmd = train_fixtures.train_command(str(workdir), {**base, "mesh": "8x1", "grad_accum_steps": 2})
  run = subprocess.run(cmd, cwd=train_fixtures.REPO, env=_env(8), capture_output=True, text=True,
                       timeout=TIMEOUT_S)
  errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
  assert run.returncode == 2, run.stderr[-2000:]
  assert errors == ["error: the micro-batch of 4 examples (batch_size 8 / grad_accum_steps 2) "
                    "is not divisible by the mesh's data axis (8)"], run.stderr[-2000:]
  assert "Traceback" not in run.stderr
  assert not (workdir / "checkpoints").exists() and not (workdir / "final.npz").exists()
