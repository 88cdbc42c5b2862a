"""GIFs of sampling (`--gif`): the grid of samples as it fills (one-step-per-token priors) or
unmasks (the absorbing prior's samplers), each frame decoded by the tokenizer with the tokens
not yet drawn shown grey.

The priors call `on_step(tokens, decided)` before their first step and after every step that
draws (priors/base.py); `SamplingFrames` is that callback, batch after batch. It keeps every
step while there are at most MAX_FRAMES of them, then every 2nd, every 4th, ...: a raster draw
of a 16x16 grid (257 calls) gives 33 frames, a 4x4 grid of VQ codes 17, the absorbing prior at
8 steps 9; the last step is always the last frame, so the GIF ends on the saved samples.
"""

import torch
from PIL import Image

from pipeline.visual import image_grid

MAX_FRAMES = 64      # more calls than this halve the frames kept
MAX_IMAGES = 64      # images a frame shows (the first ones drawn)
GREY = 0.5           # where a token is not drawn yet
FRAME_MS, LAST_FRAME_MS = 100, 2000


class BatchFrames:
    """on_step for one batch: keeps the first `keep` grids of every `stride`-th call, doubling
    the stride whenever more than MAX_FRAMES are held, and the last call."""

    def __init__(self, keep):
        self.keep, self.stride, self.calls = keep, 1, 0
        self.frames, self.last = [], None  # [(call, tokens, decided)], CPU tensors

    def __call__(self, tokens, decided):
        call, self.calls = self.calls, self.calls + 1
        # the sampler hands over fresh tensors; copied to the CPU only when kept
        self.last = (call, tokens[:self.keep], decided[:self.keep])
        if call % self.stride:
            return
        self.frames.append((call, tokens[:self.keep].cpu(), decided[:self.keep].cpu()))
        if len(self.frames) > MAX_FRAMES:
            self.stride *= 2
            self.frames = [f for f in self.frames if f[0] % self.stride == 0]

    def kept(self):
        """[(tokens (n, h, w), decided (n, h, w))] in order, ending on the last call."""
        frames = list(self.frames)
        if self.last is not None and (not frames or frames[-1][0] != self.last[0]):
            call, tokens, decided = self.last
            frames.append((call, tokens.cpu(), decided.cpu()))
        return [(tokens, decided) for _, tokens, decided in frames]


class SamplingFrames:
    """The frames of a draw made in batches (pipeline.generate.sample_tokens asks `batch(count)`
    for each batch's on_step): the first `limit` images."""

    def __init__(self, limit=MAX_IMAGES):
        self.limit, self.batches = limit, []

    def batch(self, count):
        """on_step for the next batch of `count` grids, or None once `limit` images are held."""
        held = sum(b.keep for b in self.batches)
        if held >= self.limit:
            return None
        self.batches.append(BatchFrames(min(count, self.limit - held)))
        return self.batches[-1]

    def frames(self):
        """[(tokens (n, h, w), decided (n, h, w))]: frame i joins each batch's i-th (a batch
        that stopped earlier shows its last)."""
        kept = [b.kept() for b in self.batches if b.calls]
        if not kept:
            return []
        return [(torch.cat([k[min(i, len(k) - 1)][0] for k in kept]),
                 torch.cat([k[min(i, len(k) - 1)][1] for k in kept]))
                for i in range(max(len(k) for k in kept))]


@torch.no_grad()
def render(frames, tokenizer, tone=None, ncol=8, row_titles=None):
    """Decode each frame's grids (tone-mapped by `tone` when given, as the samples are), grey
    where not drawn yet -> [PIL image], laid out as image_grid(ncol, row_titles)."""
    images = []
    for tokens, decided in frames:
        decoded = tokenizer.decode(tokens.masked_fill(~decided, 0).long())  # any value decodes
        if tone is not None:
            decoded = tone(decoded)
        shown = torch.where(known_pixels(tokenizer, decided, decoded.shape), decoded,
                            torch.full_like(decoded, GREY))
        images.append(image_grid(shown, ncol=ncol, row_titles=row_titles))
    return images


def known_pixels(tokenizer, decided, shape):
    """(N, h, w) decided tokens -> (N, 1, S, S) bool, True where every token of a pixel is
    decided; also for a grid larger than the tokenizer's (absorbing's --grid_h/--grid_w),
    whose images are larger than the tokenizer's own."""
    known = tokenizer.known_pixels(decided)
    if tuple(known.shape[-2:]) == tuple(shape[-2:]):
        return known
    n, h, w = decided.shape
    per_pixel = decided.view(n, h, w // tokenizer.values_per_pixel, -1).all(-1)
    return torch.nn.functional.interpolate(per_pixel[:, None].float(), size=tuple(shape[-2:]),
                                           mode="nearest").bool()


def save_gif(images, path, grey=False):
    """Frames (PIL images) -> an endlessly looping GIF, the last frame held longer. Grey frames
    are stored as greys ("L": 256 levels, exact in a GIF's palette); colour ones are quantised
    to a palette per frame."""
    frames = [image.convert("L") if grey else image for image in images]
    durations = [FRAME_MS] * (len(frames) - 1) + [LAST_FRAME_MS]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:],
                   duration=durations, loop=0)
    return path


def read_gif(path):
    """A GIF's frames as PIL images (full frames, composed): for tests and checks."""
    frames = []
    with Image.open(path) as gif:
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(gif.convert("RGB"))
    return frames
