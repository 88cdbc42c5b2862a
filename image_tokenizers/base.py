"""What every tokenizer answers: the interface that quantizing, the priors, generation, the
quality figures and serving call, whatever the kind.

    encode(images (N, C, S, S) floats in [0, 1]) -> (N, h, w) LongTensor of tokens
    decode(tokens (N, h, w))                     -> (N, C, S', S') floats in [0, 1]
                                                    (S' > S for a grid larger than `grid`)
    known_pixels(known (N, h, w) bool)           -> (N, 1, S, S) bool: the pixels that the
                                                    known tokens determine (completion figures)

and describes its tokens: `vocab_size` (K values), `grid` (h, w), `values_per_pixel` (tokens
along a row that make one pixel: 3 for an RGB byte stream, else 1), `ordered` (values are
ordered intensities, so a logistic-mixture head applies), `image_size` and `in_channels`.

How a kind is made: `fitted = True` means one pass over the training split's images
(`Model.fit(config, images, seed)`, e.g. a k-means palette, or nothing to fit at all);
`fitted = False` means gradient steps (pipeline/train_tokenizer.py, where `forward(images)`
returns (reconstruction, loss, tokens)).

A kind is a model file with a config dataclass (with `image_size`, `in_channels` and
`validate()`) and a `Tokenizer` subclass, named `Config` and `Model` at the module's end, plus one
line in image_tokenizers/__init__.py.
"""

import torch.nn as nn


class Tokenizer(nn.Module):
    kind = None       # the registry name, also the checkpoint's "kind"
    fitted = False    # True: fitted in one pass over images (fit); False: trained by steps
    lossless = False  # True: encode(decode(t)) == t for tokens t that encode gave

    def __init__(self, config):
        super().__init__()
        config.validate()
        self.config = config

    # the tokens

    @property
    def vocab_size(self):
        raise NotImplementedError

    @property
    def grid(self):
        raise NotImplementedError

    @property
    def values_per_pixel(self):
        return 1

    @property
    def ordered(self):
        return False

    @property
    def image_size(self):
        return self.config.image_size

    @property
    def in_channels(self):
        return self.config.in_channels

    @property
    def image_dims(self):
        """Dimensions of one image (pixels x channels): bits per dimension are per these."""
        return self.image_size ** 2 * self.in_channels

    def run_name(self):
        """The settings that tell this kind's runs apart, e.g. 'vqvae f4 K64 16px'."""
        return f"{self.kind} K{self.vocab_size} {self.image_size}px"

    # the verbs

    def encode(self, images):
        raise NotImplementedError

    def decode(self, tokens):
        raise NotImplementedError

    def known_pixels(self, known):
        """Default: a token covers an (S / h) x (S / w * values_per_pixel) block of pixels, and a
        pixel is known when every token covering it is."""
        n, h, w = known.shape
        per_pixel = known.view(n, h, w // self.values_per_pixel, self.values_per_pixel).all(-1)
        rows = self.image_size // h
        cols = self.image_size // (w // self.values_per_pixel)
        return per_pixel.repeat_interleave(rows, 1).repeat_interleave(cols, 2)[:, None]

    @classmethod
    def fit(cls, config, images, seed=0):
        """A fitted kind's model from training images (N, C, S, S) in [0, 1]."""
        raise NotImplementedError(f"the {cls.kind} tokenizer is trained by steps, not fitted")
