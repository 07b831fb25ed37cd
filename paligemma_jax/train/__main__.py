"""python -m paligemma_jax.train --config=configs/transfer.py --workdir=DIR [--config.FIELD=V]

Running the same command again resumes from DIR's newest checkpoint.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
try:
  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(_REPO, "configs", "transfer.py"),
      "Training settings (ml_collections); override fields with --config.FIELD=VALUE.")
except (AttributeError, KeyError, TypeError, ValueError) as e:
  print(f"error: --config: {e}", file=sys.stderr)
  sys.exit(2)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, "
                               "final.npz. A directory with a checkpoint is resumed.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Multi-host: call jax.distributed.initialize() first (one "
                                 "command per host, same flags).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "--distributed: host:port of process 0 (default: detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "--distributed: number of hosts.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "--distributed: this host's index.")


def _fail(msg: str):
  print(f"error: {msg}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(2)  # as main.py: no Orbax thread may print under the error line


def main(argv):
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; settings are --config.FIELD=VALUE")
  if not _WORKDIR.value:
    _fail("--workdir=DIR is required (checkpoints, metrics.jsonl and final.npz go there)")
  if _DISTRIBUTED.value:
    from paligemma_jax import sharding
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from paligemma_jax.data.jsonl import DataError
  from paligemma_jax.train.trainer import Trainer, TrainError
  try:
    trainer = Trainer(_CONFIG.value, _WORKDIR.value, progress=_PROGRESS.value)
    trainer.run()
  except (TrainError, DataError) as e:
    _fail(str(e))


if __name__ == "__main__":
  app.run(main)
