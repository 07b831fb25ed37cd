"""Checks of the files a run will write or need, made before anything loads.

A bad output path found after generating loses the answer (minutes with a large model), so
main.py, batch jobs and the interactive loop check theirs first, with these functions.
Each raises `PathError` naming the flag, the path and what is wrong.
"""
import os
import zipfile

import numpy as np


class PathError(ValueError):
  """A path that cannot be used; the message says which and why."""


def _name(path, flag) -> str:
  return f"{flag}={path}" if flag else str(path)


def _writable_parent(path: str, flag: str):
  """The nearest existing folder above `path` (created as needed) must be a writable directory."""
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.lexists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise PathError(f"{_name(path, flag)}: {parent} is not a directory")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise PathError(f"{_name(path, flag)}: {parent} is not writable")


def check_output_file(path: str, flag: str) -> str:
  """A file to (re)write: not a directory, writable, its folder writable. -> absolute path."""
  if os.path.isdir(path):
    raise PathError(f"{_name(path, flag)}: is a directory; give a file name")
  _writable_parent(path, flag)
  if os.path.lexists(path):
    if not os.path.isfile(path):
      raise PathError(f"{_name(path, flag)}: not a regular file")
    if not os.access(path, os.W_OK):
      raise PathError(f"{_name(path, flag)}: is not writable")
  return os.path.abspath(path)


def check_output_dir(path: str, flag: str) -> str:
  """A directory to write into, existing or created: -> absolute path."""
  if os.path.lexists(path):
    if not os.path.isdir(path):
      raise PathError(f"{_name(path, flag)}: not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
      raise PathError(f"{_name(path, flag)}: is not writable")
  else:
    _writable_parent(path, flag)
  return os.path.abspath(path)


def check_new_dir(path: str, flag: str) -> str:
  """A directory that must not exist yet (a checkpoint to save): -> absolute path."""
  if os.path.lexists(path):
    raise PathError(f"{_name(path, flag)}: already exists; choose a new directory")
  _writable_parent(path, flag)
  return os.path.abspath(path)


def same_file(a: str, b: str) -> bool:
  """Whether two paths name one file (symlinks, relative paths and hard links resolved)."""
  if os.path.realpath(a) == os.path.realpath(b):
    return True
  try:
    return os.path.samefile(a, b)
  except OSError:
    return False


def check_vae(path: str, flag: str = "--vae_ckpt"):
  """vae-oid.npz: a readable .npz holding every decoder array with its shape.

  Reads only the zip directory and each member's .npy header, not the arrays.
  """
  from paligemma_jax.model import vqvae
  if not os.path.lexists(path):
    raise PathError(f"{_name(path, flag)}: no such file")
  if not os.path.isfile(path):
    raise PathError(f"{_name(path, flag)}: not a file")
  try:
    with zipfile.ZipFile(path) as z:
      names = set(z.namelist())
      for key, shape in vqvae.vae_keys(("decoder",)).items():
        if f"{key}.npy" not in names:
          raise PathError(f"{_name(path, flag)}: key '{key}' missing (expected shape {shape}); "
                          "not the VQ-VAE checkpoint vae-oid.npz")
        with z.open(f"{key}.npy") as f:
          read = {(1, 0): np.lib.format.read_array_header_1_0}.get(
              np.lib.format.read_magic(f), np.lib.format.read_array_header_2_0)
          found, _, dtype = read(f)
        if tuple(found) != tuple(shape) or dtype.hasobject:
          raise PathError(f"{_name(path, flag)}: key '{key}' has shape {tuple(found)} and dtype "
                          f"{dtype}; expected shape {shape}")
  except PathError:
    raise
  except (OSError, zipfile.BadZipFile, ValueError) as e:
    raise PathError(f"{_name(path, flag)}: not a readable .npz file ({e})") from None


def check_outputs(*, output_json=None, output_jsonl=None, output_dir=None, save_orbax=None,
                  save_hf=None, vae_ckpt=None):
  """Checks each given path (flag names as main.py's); raises PathError for the first bad one."""
  if output_json:
    check_output_file(output_json, "--output_json")
  if output_jsonl:
    check_output_file(output_jsonl, "--output_jsonl")
  if output_dir:
    check_output_dir(output_dir, "--output_dir")
  if save_orbax:
    check_new_dir(save_orbax, "--save_orbax")
  if save_hf:
    check_new_dir(save_hf, "--save_hf")
  if vae_ckpt:
    check_vae(vae_ckpt)
