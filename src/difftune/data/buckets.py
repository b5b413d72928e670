"""Aspect-ratio buckets (data.enable_bucket), as kohya sd-scripts' BucketManager defines them.

Buckets. With `data.resolution` R, the predefined buckets are kohya's `make_bucket_resolutions`: the
square R x R, and for every width w from `min_bucket_reso` to `max_bucket_reso` in steps of
`bucket_reso_steps` the bucket (w, h) with h the largest multiple of the step with w·h <= R² (capped
at the maximum, kept when h >= the minimum), and its transpose. Every side is a multiple of the step
and the step divides R, so the square bucket always exists. Defaults follow from R (kohya's 256 / 1024
at 512): min R/2 and max 2R (rounded to the step), step 64 or, where 64 does not divide R, the largest
power of two that does (16 at R = 16, so a small test resolution has only the square bucket). The
step must be a multiple of 8 (the VAE); what a model needs beyond that (Flux/SD3 pack 2x2 latent
patches: 16 px) is checked where the model meets the batch (training/step.py `check_latent_size`).

Assignment. An image goes to the bucket of its own size if that is predefined, else to the one nearest
its aspect ratio; it is resized to cover the bucket (the scale of the side that fits, the other side
rounded and at least the bucket's) and cropped to it: centered, or at a random position with
`data.center_crop = false`. For the square bucket this is exactly the square crop difftune made before
buckets. With `bucket_no_upscale` there are no predefined buckets (kohya ignores min/max there too): an
image of at most R² pixels keeps its size and its bucket is that size rounded down to the step (the
rest is cropped); a larger one is scaled down to about R² pixels with kohya's rounding first. A side
below one step becomes one step (that image is upscaled; doctor warns).

Batches (dataset.py orders them). Every batch holds one bucket's images. Per epoch a bucket with at
least `train.batch_size` samples makes `samples // batch_size` full batches and its remaining samples
sit that epoch out (the order changes every epoch, so none is left out for good), as difftune always
did. A short bucket (fewer samples than a batch) makes one short batch of all its samples, as kohya
does (kohya makes ceil(samples / batch_size) batches per bucket, its last one short); the exception
is a dataset that is one short bucket, which wraps around to one full batch, as before. So a short
bucket adds one step per epoch: `batches_per_epoch` below is what plan.py, doctor and the LR schedule
count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

Size = tuple[int, int]
"""(height, width) in pixels, the order diffusers' SDXL conditioning uses."""

DEFAULT_STEPS = 64
"""kohya's bucket_reso_steps."""
VAE_MULTIPLE = 8
"""Every family's VAE downsamples by 8 (data.resolution must be a multiple of it too)."""


@dataclass(frozen=True)
class Placement:
    bucket: Size
    """The crop's (height, width): what the model is trained to produce (SDXL's target size)."""
    resized: Size
    """The (height, width) the image is resized to before cropping; each side >= the bucket's."""


@dataclass(frozen=True)
class BucketSpec:
    """Resolved bucket settings (every default filled in, validated)."""

    resolution: int
    enabled: bool = True
    steps: int = DEFAULT_STEPS
    min_side: int = 0
    max_side: int = 0
    no_upscale: bool = False

    @property
    def max_area(self) -> int:
        return self.resolution * self.resolution

    def predefined(self) -> list[Size]:
        """The buckets an image can be placed in (none with no_upscale, where each image's size makes
        its own), as (height, width), in kohya's order (sorted by width, then height)."""
        r = self.resolution
        if not self.enabled:
            return [(r, r)]
        if self.no_upscale:
            return []
        resos = {(r, r)}
        width = self.min_side
        while width <= self.max_side:
            height = min(self.max_side, (self.max_area // width) // self.steps * self.steps)
            if height >= self.min_side:
                resos |= {(width, height), (height, width)}
            width += self.steps
        return [(h, w) for w, h in sorted(resos)]

    def place(self, original: Size) -> Placement:
        """The bucket and resized size of an image of `original` (height, width)."""
        if self.enabled and self.no_upscale:
            return self._place_no_upscale(original)
        height, width = original
        buckets = self.buckets
        if original in buckets:
            bucket = original
        else:
            aspect = width / height
            bucket = min(buckets, key=lambda b: abs(b[1] / b[0] - aspect))  # the first of equals, as argmin
        return Placement(bucket, cover(bucket, original))

    @cached_property
    def buckets(self) -> list[Size]:
        return self.predefined()

    def _place_no_upscale(self, original: Size) -> Placement:
        """kohya's select_bucket with no_upscale (sizes as (height, width) here, (width, height) there)."""
        height, width = original
        aspect = width / height
        if width * height > self.max_area:
            resized_width = math.sqrt(self.max_area * aspect)
            resized_height = self.max_area / resized_width
            w_rounded = self._round(resized_width)
            h_of_w = self._round(w_rounded / aspect)
            h_rounded = self._round(resized_height)
            w_of_h = self._round(h_rounded * aspect)
            if abs(w_rounded / h_of_w - aspect) < abs(w_of_h / h_rounded - aspect):
                resized = (int(w_rounded / aspect + 0.5), w_rounded)
            else:
                resized = (h_rounded, int(h_rounded * aspect + 0.5))
        else:
            resized = original
        bucket = tuple(max(self.steps, side - side % self.steps) for side in resized)
        if resized[0] < bucket[0] or resized[1] < bucket[1]:  # a side below one step: upscale to cover it
            resized = cover(bucket, original)
        return Placement(bucket, resized)

    def _round(self, x: float) -> int:
        """kohya's round_to_steps, at least one step (kohya divides by zero below that)."""
        x = int(x + 0.5)
        return max(self.steps, x - x % self.steps)


def cover(bucket: Size, original: Size) -> Size:
    """The smallest resize of `original` that covers `bucket` keeping the aspect ratio: the side that
    fits is the bucket's, the other is rounded and at least the bucket's. For a square bucket of side R
    this is the short side resized to R (difftune's crop before buckets, to the bit)."""
    scale = resize_scale(bucket, original)
    return max(bucket[0], round(original[0] * scale)), max(bucket[1], round(original[1] * scale))


def resize_scale(bucket: Size, original: Size) -> float:
    return max(bucket[0] / original[0], bucket[1] / original[1])


def resolve(resolution: int, enabled: bool = True, min_side: int | None = None, max_side: int | None = None,
            steps: int | None = None, no_upscale: bool = False) -> tuple[BucketSpec, list[str]]:
    """The BucketSpec of these settings and notes on what was adjusted (kohya rounds min_bucket_reso
    down and max_bucket_reso up to the step). Raises ValueError naming the key to change."""
    if not enabled:
        return BucketSpec(resolution, enabled=False, steps=resolution, min_side=resolution, max_side=resolution), []
    if steps is None:
        steps = math.gcd(resolution, DEFAULT_STEPS)
        if steps % VAE_MULTIPLE:
            raise ValueError(f"data.resolution = {resolution} is not a multiple of {VAE_MULTIPLE}")
    elif steps % VAE_MULTIPLE:
        raise ValueError(f"data.bucket_reso_steps = {steps} is not a multiple of {VAE_MULTIPLE} (the VAE downsamples "
                         f"by 8): use 64 (kohya's default), 32 or 16")
    elif resolution % steps:
        usable = math.gcd(resolution, steps)
        raise ValueError(f"data.bucket_reso_steps = {steps} does not divide data.resolution = {resolution}, so there "
                         f"would be no {resolution}x{resolution} bucket: set bucket_reso_steps to {usable}" +
                         (f" (or a multiple of 8 that divides {resolution})" if usable >= VAE_MULTIPLE else "")
                         + " or change data.resolution")
    notes = []
    if min_side is None:
        min_side = max(steps, resolution // 2 // steps * steps)
    elif min_side % steps:
        adjusted = min_side - min_side % steps
        notes.append(f"data.min_bucket_reso = {min_side} is not a multiple of bucket_reso_steps ({steps}): "
                     f"using {adjusted}, as kohya does")
        min_side = adjusted
    if max_side is None:
        max_side = -(-resolution * 2 // steps) * steps
    elif max_side % steps:
        adjusted = max_side + steps - max_side % steps
        notes.append(f"data.max_bucket_reso = {max_side} is not a multiple of bucket_reso_steps ({steps}): "
                     f"using {adjusted}, as kohya does")
        max_side = adjusted
    if not no_upscale:
        if min_side < steps:
            raise ValueError(f"data.min_bucket_reso must be at least bucket_reso_steps ({steps}) px")
        if min_side > resolution:
            raise ValueError(f"data.min_bucket_reso = {min_side} is above data.resolution = {resolution}: the "
                             f"{resolution}x{resolution} bucket must fit; set min_bucket_reso to {resolution} or less")
        if max_side < resolution:
            raise ValueError(f"data.max_bucket_reso = {max_side} is below data.resolution = {resolution}: the "
                             f"{resolution}x{resolution} bucket must fit; set max_bucket_reso to {resolution} or more")
    return BucketSpec(resolution, True, steps, min_side, max_side, no_upscale), notes


def bucket_spec(data) -> BucketSpec:
    """The bucket settings of a DataConfig (validated when the config was)."""
    return resolve_data(data)[0]


def resolve_data(data) -> tuple[BucketSpec, list[str]]:
    """`resolve` on a DataConfig's keys."""
    return resolve(data.resolution, data.enable_bucket, data.min_bucket_reso, data.max_bucket_reso,
                   data.bucket_reso_steps, data.bucket_no_upscale)


def square_spec(resolution: int) -> BucketSpec:
    """One square bucket: the center crop to `resolution` difftune made before buckets."""
    return resolve(resolution, enabled=False)[0]


def bucket_batch_sizes(samples: int, batch_size: int, only_bucket: bool) -> list[int]:
    """The sizes of the batches one bucket's `samples` of an epoch make (see the module docstring)."""
    if samples >= batch_size:
        return [batch_size] * (samples // batch_size)
    if samples == 0:
        return []
    return [batch_size if only_bucket else samples]


def batches_per_epoch(samples_per_bucket: dict[Size, int], batch_size: int) -> int:
    """Micro-batches of an epoch with these samples per bucket (at least one)."""
    only = len([n for n in samples_per_bucket.values() if n]) == 1
    return max(1, sum(len(bucket_batch_sizes(n, batch_size, only)) for n in samples_per_bucket.values()))


def kept_fraction(bucket: Size, original: Size) -> float:
    """The fraction of the image's area the bucket's crop keeps (1 when the aspect ratios match)."""
    across, along = bucket[1] * original[0], original[1] * bucket[0]  # the two aspect ratios, cross-multiplied
    return min(across, along) / max(across, along)


def placements(spec: BucketSpec, records) -> list[Placement]:
    """Each record's placement, from the size read when its folder was scanned."""
    out = []
    for record in records:
        width, height = record.size
        if not (width and height):
            from difftune.errors import DatasetError

            raise DatasetError(f"{record.path}: image size unknown (the folder scan reads it)")
        out.append(spec.place((height, width)))
    return out


def bucket_counts(placed: list[Placement], samples: list[int]) -> dict[Size, int]:
    """Samples per bucket of an epoch's sample list (record indices into `placed`)."""
    counts: dict[Size, int] = {}
    for record in samples:
        counts[placed[record].bucket] = counts.get(placed[record].bucket, 0) + 1
    return counts
