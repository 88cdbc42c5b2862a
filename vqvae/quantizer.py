"""Vector quantizer with an EMA codebook, k-means initialisation and dead-code restarts.

Codebook health is the point of this file. Three proven techniques keep usage high:
- the codebook follows the encoder by exponential moving averages of assigned vectors
  (van den Oord et al. 2017, appendix; Razavi et al. 2019), not by gradient;
- it starts as k-means centroids of the first training batch (as in Jukebox / SoundStream), so
  no code starts far from the data;
- a code whose EMA assignment count falls below `dead_code_threshold` is restarted on a random
  encoder output from the current batch (SoundStream, Zeghidour et al. 2021).
Under DistributedDataParallel the statistics are summed across ranks and rank 0's choices are
broadcast, so every rank keeps the same codebook. With gradient accumulation
(`defer_updates = True`) the statistics of the micro-batches are summed too and applied once per
optimizer step by `apply_deferred_update()`, so the EMA sees one batch per step whatever the
number of micro-batches (and needs no retuning of `decay`).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist

# helpers


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(tensor):
    if _distributed():
        dist.all_reduce(tensor)
    return tensor


def _broadcast(tensor):
    if _distributed():
        dist.broadcast(tensor, src=0)
    return tensor


def squared_distances(vectors, codebook):
    """(N, D), (K, D) -> (N, K) squared Euclidean distances, in fp32 even under autocast: |v|^2
    - 2 v.c + |c|^2 subtracts numbers far larger than the gaps between neighbouring codes, and
    a bf16 matmul (8 bits of mantissa) would hand vectors to the wrong code."""
    with torch.autocast(vectors.device.type, enabled=False):
        vectors, codebook = vectors.float(), codebook.float()
        return (vectors.pow(2).sum(1, keepdim=True)
                - 2 * vectors @ codebook.t()
                + codebook.pow(2).sum(1)[None, :])


def kmeans(vectors, k, iters=10, generator=None):
    """Lloyd's k-means on (N, D) vectors; returns centroids (k, D) and cluster sizes (k,)."""
    n = vectors.shape[0]
    pick = torch.randint(n, (k,), generator=generator) if n < k else torch.randperm(n, generator=generator)[:k]
    centroids = vectors[pick.to(vectors.device)].clone()
    for _ in range(iters):
        assign = squared_distances(vectors, centroids).argmin(1)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, assign, vectors)
        # an empty cluster keeps its centroid; the dead-code restart deals with it later
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
    counts = torch.bincount(squared_distances(vectors, centroids).argmin(1), minlength=k).float()
    return centroids, counts

# main class


class VectorQuantizer(nn.Module):

    def __init__(self, codebook_size, code_dim, commitment=0.25, decay=0.99,
                 dead_code_threshold=1.0, eps=1e-5):
        super().__init__()
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.commitment, self.decay, self.eps = commitment, decay, eps
        self.dead_code_threshold = dead_code_threshold
        self.register_buffer("codebook", torch.randn(codebook_size, code_dim))
        self.register_buffer("ema_count", torch.ones(codebook_size))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("initialized", torch.tensor(False))
        self.defer_updates = False  # set by a trainer that accumulates micro-batches
        self._deferred = None  # (counts (K,), sums (K, D), the last micro-batch's vectors)

    def indices(self, z):
        """(B, D, h, w) encoder output -> (B, h, w) nearest-code indices."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        return squared_distances(flat, self.codebook).argmin(1).view(b, h, w)

    def lookup(self, indices):
        """(B, h, w) indices -> (B, D, h, w) code vectors."""
        return self.codebook[indices].permute(0, 3, 1, 2).contiguous()

    def forward(self, z):
        """(B, D, h, w) -> quantized (B, D, h, w) with straight-through gradient to z,
        the commitment loss, and the indices (B, h, w)."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()  # (N, D), N = B*h*w
        if self.training and not bool(self.initialized):
            self._init_from(flat.detach())
        indices = squared_distances(flat, self.codebook).argmin(1)  # (N,)
        if self.training:
            self._ema_update(flat.detach(), indices)
        quantized = self.codebook[indices]  # (N, D)
        # Commitment: pull the encoder towards its (fixed) code. The codebook itself moves by
        # EMA, so it needs no loss term of its own.
        commitment_loss = self.commitment * F.mse_loss(flat, quantized.detach())
        # Straight-through: forward uses the code, backward passes the gradient to the encoder.
        quantized = flat + (quantized - flat).detach()
        quantized = quantized.view(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)
        return quantized, commitment_loss, indices.view(b, h, w)

    @torch.no_grad()
    def _init_from(self, flat):
        centroids, counts = kmeans(flat, self.codebook_size)
        self.codebook.copy_(_broadcast(centroids))
        self.ema_count.copy_(_broadcast(counts.clamp(min=1.0)))
        self.ema_sum.copy_(self.codebook * self.ema_count[:, None])
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat, indices):
        counts = torch.bincount(indices, minlength=self.codebook_size).float()
        sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, flat)
        if self.defer_updates:
            if self._deferred is not None:
                counts, sums = counts + self._deferred[0], sums + self._deferred[1]
            self._deferred = (counts, sums, flat)
        else:
            self._apply_statistics(counts, sums, flat)

    @torch.no_grad()
    def apply_deferred_update(self):
        """One EMA step (and dead-code check) from every training forward since the last call."""
        if self._deferred is not None:
            counts, sums, flat = self._deferred
            self._deferred = None
            self._apply_statistics(counts, sums, flat)

    @torch.no_grad()
    def _apply_statistics(self, counts, sums, flat):
        _all_reduce_sum(counts)
        _all_reduce_sum(sums)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # Laplace smoothing keeps a rarely used code from dividing by ~0.
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (total + self.codebook_size * self.eps) * total
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        self._restart_dead_codes(flat)

    @torch.no_grad()
    def _restart_dead_codes(self, flat):
        dead = self.ema_count < self.dead_code_threshold  # identical on every rank
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        pick = torch.randint(flat.shape[0], (n_dead,), device=flat.device)
        replacements = _broadcast(flat[pick].contiguous())
        self.codebook[dead] = replacements
        # Start a restarted code at the threshold so it has a few steps to win assignments.
        self.ema_count[dead] = self.dead_code_threshold
        self.ema_sum[dead] = replacements * self.dead_code_threshold
