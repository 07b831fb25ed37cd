"""PyTorch reference of the mask VQ-VAE behind big_vision's vae-oid.npz.

Written from the architecture of https://arxiv.org/abs/2301.02229 (hidden 16,
downsample 16, 2 res blocks, 128 codes of 512 dims) so that `state_dict()` has
exactly the npz key names. Used only by the parity tests.
"""

import numpy as np
import torch
from torch import nn


class ResBlock(nn.Module):

  def __init__(self, dim):
    super().__init__()
    self.net = nn.Sequential(
        nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(),
        nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(),
        nn.Conv2d(dim, dim, 1))

  def forward(self, x):
    return self.net(x) + x


class Quantizer(nn.Module):
  """Holds the codebook as the buffer `_embedding` (key `_vq_vae._embedding`)."""

  def __init__(self, num_codes=128, dim=512):
    super().__init__()
    self.register_buffer("_embedding", torch.randn(num_codes, dim))

  def nearest(self, z):
    """(B,C,4,4) -> (B,16) nearest rows, row-major over the grid."""
    b = z.shape[0]
    flat = z.permute(0, 2, 3, 1).reshape(-1, self._embedding.shape[1])
    dist = (flat.pow(2).sum(1, keepdim=True) + self._embedding.pow(2).sum(1)
            - 2 * flat @ self._embedding.t())
    return dist.argmin(1).reshape(b, 16)

  def lookup(self, codes):
    """(B,16) -> (B,C,4,4)."""
    q = self._embedding[codes.reshape(-1)]
    return q.reshape(codes.shape[0], 4, 4, -1).permute(0, 3, 1, 2)


class VQVAE(nn.Module):

  def __init__(self):
    super().__init__()
    enc, dim = [nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU()], 16
    for _ in range(3):
      enc += [nn.Conv2d(dim, 2 * dim, 4, stride=2, padding=1), nn.ReLU()]
      dim *= 2
    enc += [ResBlock(dim), ResBlock(dim), nn.Conv2d(dim, 512, 1)]
    dec = [nn.Conv2d(512, 128, 1), nn.ReLU(), ResBlock(128), ResBlock(128),
           nn.ConvTranspose2d(128, 128, 4, stride=2, padding=1), nn.ReLU()]
    dim = 128
    for _ in range(3):
      dec += [nn.ConvTranspose2d(dim, dim // 2, 4, stride=2, padding=1),
              nn.ReLU()]
      dim //= 2
    dec += [nn.Conv2d(dim, 1, 1)]
    self.encoder = nn.Sequential(*enc)
    self.decoder = nn.Sequential(*dec)
    self._vq_vae = Quantizer()

  def encode(self, masks):
    """(B,64,64) in [0,1] -> (B,16) codes."""
    x = 2.0 * (masks[:, None] - 0.5)
    return self._vq_vae.nearest(self.encoder(x))

  def decode(self, codes):
    """(B,16) codes -> (B,64,64)."""
    return self.decoder(self._vq_vae.lookup(codes))[:, 0]


def load_npz(path, dtype=torch.float32):
  """A VQVAE with the npz's arrays loaded strictly by key name."""
  model = VQVAE()
  with np.load(path, allow_pickle=False) as npz:
    state = {k: torch.from_numpy(npz[k]).to(dtype) for k in npz.files}
  model.load_state_dict(state, strict=True)
  return model.to(dtype).eval()
