"""Glyphs: a procedural few-shot image dataset of random pen strokes, generated in pure torch."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from .tasks import _check_int

__all__ = ["Glyphs"]

_POINTS_PER_STROKE = 20  # samples along each quadratic Bezier stroke, about one profile width apart
_CENTRE = 0.35  # stroke centres lie in [-_CENTRE, _CENTRE]^2 of the [-1, 1]^2 canvas
_LENGTH = (0.6, 1.1)  # range of stroke lengths (chords), in canvas units
# Per-example jitter at `distortion=1`: rotation (radians), relative scale, shear and
# stroke-width log-factor (uniform +-), translation (uniform +-, canvas units) and the
# standard deviation of the control-point wobble (canvas units).
_JITTER = {"angle": 0.25, "scale": 0.12, "shear": 0.12, "width": 0.2, "shift": 0.12, "wobble": 0.06}
_SIGMA = 0.055  # stroke profile width (Gaussian sigma) in canvas units; a canvas is 2 units wide
_GAIN = 2.0  # ink saturation: intensity = tanh(_GAIN * coverage)
_FLOOR = -30.0  # exponents are clamped here: tiny values would be denormal floats, slow in exp and matmul


def _bezier(control: Tensor) -> Tensor:
    """Points along quadratic Bezier curves: ``(..., 3, 2)`` control points -> ``(..., P, 2)``."""
    t = torch.linspace(0.0, 1.0, _POINTS_PER_STROKE, dtype=control.dtype).unsqueeze(-1)
    p0, p1, p2 = (p.unsqueeze(-2) for p in control.unbind(-2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _uniform(gen: torch.Generator, shape: tuple[int, ...], bound: float, dtype: torch.dtype) -> Tensor:
    """Uniform numbers in ``[-bound, bound)``."""
    return bound * (2 * torch.rand(shape, generator=gen, dtype=dtype) - 1)


def _glyph_strokes(gen: torch.Generator, num_classes: int, strokes: int, dtype: torch.dtype) -> Tensor:
    """Control points ``(C, strokes, 3, 2)`` of random quadratic Bezier strokes: lines and arcs.

    A stroke has a centre in ``[-_CENTRE, _CENTRE]^2``, a direction, a length in
    ``_LENGTH`` and a bend: the middle control point leaves the chord sideways by
    up to half the length, so no stroke degenerates into a dot.
    """
    shape = (num_classes, strokes)
    centre = _uniform(gen, (*shape, 2), _CENTRE, dtype)
    angle = math.pi * torch.rand(shape, generator=gen, dtype=dtype)
    low, high = _LENGTH
    length = low + (high - low) * torch.rand(shape, generator=gen, dtype=dtype)
    bend = _uniform(gen, shape, 0.5, dtype) * length
    along = torch.stack([torch.cos(angle), torch.sin(angle)], -1)
    across = torch.stack([-along[..., 1], along[..., 0]], -1)
    half = 0.5 * length.unsqueeze(-1) * along
    return torch.stack([centre - half, centre + bend.unsqueeze(-1) * across, centre + half], -2)


def _distort(gen: torch.Generator, points: Tensor, distortion: float) -> tuple[Tensor, Tensor]:
    """Jitter every example: ``(N, S, P, 2)`` stroke points -> distorted points and ``(N,)`` stroke widths.

    Each stroke is bent by a random displacement field that is smooth along it,
    then the glyph goes through a random affine map (rotation, scaling, shear,
    translation); the stroke width is scaled by a random factor.
    """
    n, dtype, amount = points.shape[0], points.dtype, {k: v * distortion for k, v in _JITTER.items()}
    t = torch.linspace(0.0, 1.0, points.shape[2], dtype=dtype)[:, None]
    ends = amount["wobble"] * torch.randn((n, points.shape[1], 3, 1, 2), generator=gen, dtype=dtype)
    points = points + (1 - t) ** 2 * ends[:, :, 0] + 2 * t * (1 - t) * ends[:, :, 1] + t**2 * ends[:, :, 2]
    angle = _uniform(gen, (n,), amount["angle"], dtype)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    scale = 1 + _uniform(gen, (n, 2), amount["scale"], dtype)
    stretch = torch.diag_embed(scale)
    stretch[:, 0, 1] = _uniform(gen, (n,), amount["shear"], dtype)
    shift = _uniform(gen, (n, 1, 2), amount["shift"], dtype)
    flat = points.reshape(n, -1, 2) @ (rotation @ stretch).transpose(1, 2) + shift
    sigma = _SIGMA * torch.exp(_uniform(gen, (n,), amount["width"], dtype))
    return flat.reshape(points.shape), sigma


def _render(points: Tensor, ink: Tensor, sigma: Tensor, image_size: int) -> Tensor:
    r"""Render strokes given as dense points with a soft, separable line profile.

    Every point deposits a Gaussian blob :math:`w_k e^{-|p - p_k|^2 / 2\sigma^2}`
    whose weight :math:`w_k` is the arc length it stands for over
    :math:`\sigma \sqrt{2 \pi}`, so a stroke's cross-section peaks near 1 whatever
    the sampling. The blobs are separable in ``x`` and ``y``, so the whole canvas
    is one batched matrix product; ink saturates through ``tanh``.

    Args:
        points: ``(N, S, P, 2)`` points along each stroke in canvas units (``y`` down).
        ink: ``(N, S)`` 1 for strokes to draw, 0 for unused stroke slots.
        sigma: ``(N,)`` stroke profile widths in canvas units.
        image_size: Side of the square image in pixels.

    Returns:
        ``(N, image_size, image_size)`` intensities in ``[0, 1)``.
    """
    n = points.shape[0]
    step = (points[:, :, 1:] - points[:, :, :-1]).norm(dim=-1)  # (N, S, P-1)
    length = torch.nn.functional.pad(step, (0, 1)) + torch.nn.functional.pad(step, (1, 0))
    weight = (0.5 * length * ink.unsqueeze(-1)).reshape(n, -1) / (sigma.unsqueeze(-1) * math.sqrt(2 * math.pi))
    centres = torch.linspace(-1 + 1 / image_size, 1 - 1 / image_size, image_size, dtype=points.dtype)
    flat = points.reshape(n, -1, 2)
    scale = -0.5 / sigma[:, None, None] ** 2
    along_x = torch.exp((scale * (flat[..., 0:1] - centres) ** 2).clamp_min(_FLOOR))  # (N, K, W)
    along_y = torch.exp((scale * (flat[..., 1:2] - centres) ** 2).clamp_min(_FLOOR))  # (N, K, H)
    coverage = (along_y * weight.unsqueeze(-1)).transpose(1, 2) @ along_x  # (N, H, W)
    return torch.tanh(_GAIN * coverage)


def _check_amount(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got `{type(value).__name__}`.")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"`{name}` must be finite and >= 0, got {value}.")
    return float(value)


def _check_strokes(strokes: Sequence[int]) -> tuple[int, int]:
    if isinstance(strokes, (str, bytes)) or not isinstance(strokes, Sequence) or len(strokes) != 2:
        raise TypeError(f"`strokes` must be a pair (fewest, most), got {strokes!r}.")
    fewest, most = _check_int("strokes[0]", strokes[0], 1), _check_int("strokes[1]", strokes[1], 1)
    if fewest > most:
        raise ValueError(f"`strokes` must have fewest <= most, got {tuple(strokes)}.")
    return fewest, most


class Glyphs:
    """A procedural few-shot image dataset: random pen-stroke glyphs, no download needed.

    Each class is a glyph of ``strokes`` (by default 2 to 4) random lines and arcs
    (quadratic Bezier strokes), drawn from a generator seeded with ``seed``. Each
    example renders the glyph after a random distortion: every stroke bends a
    little, then the glyph is rotated (up to about 14 degrees), scaled and sheared
    (up to 12 %) and shifted (up to about 1.7 pixels on 28), with a random stroke
    width; finally Gaussian pixel noise of standard deviation ``noise`` is added
    and intensities are clipped to ``[0, 1]``: strokes near 1 on a background near
    0, like inverted Omniglot. ``distortion`` scales all the geometric jitter
    (``distortion=0, noise=0`` renders every example of a class identically).

    All images are generated at construction, vectorised, into :attr:`images`
    (``(N, 1, image_size, image_size)``) and :attr:`labels` (``(N,)``, int64),
    ordered class by class: example ``e`` of class ``c`` has index
    ``c * examples_per_class + e``. The same arguments give the same dataset; a
    different ``seed`` gives different glyphs. The task is learnable but not
    trivial: with the defaults, a nearest-centroid classifier on raw pixels scores
    about 0.74 at 5-way 1-shot and 0.92 at 5-way 5-shot.

    Args:
        num_classes: Number of glyph classes (at least 1).
        examples_per_class: Examples rendered per class (at least 1).
        image_size: Side of the square images in pixels (at least 4).
        seed: Seed of the dataset's own generator (the global RNG is not touched).
        strokes: ``(fewest, most)`` strokes per glyph, both inclusive.
        distortion: Scale of the per-example geometric jitter (non-negative).
        noise: Standard deviation of the additive pixel noise (non-negative).
        dtype: Floating-point dtype of :attr:`images`.

    Raises:
        TypeError: If an argument has the wrong kind.
        ValueError: If a count, ``strokes``, ``distortion`` or ``noise`` is out of range.

    Example:
        >>> ds = Glyphs(5, examples_per_class=4, seed=0)
        >>> len(ds), ds.images.shape, ds.labels.tolist()[:5]
        (20, torch.Size([20, 1, 28, 28]), [0, 0, 0, 0, 1])
        >>> image, label = ds[5]
        >>> image.shape, label, bool(image.min() >= 0 and image.max() <= 1)
        (torch.Size([1, 28, 28]), 1, True)
    """

    def __init__(
        self,
        num_classes: int,
        examples_per_class: int = 20,
        *,
        image_size: int = 28,
        seed: int = 0,
        strokes: Sequence[int] = (2, 4),
        distortion: float = 1.0,
        noise: float = 0.05,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.num_classes = _check_int("num_classes", num_classes, 1)
        self.examples_per_class = _check_int("examples_per_class", examples_per_class, 1)
        self.image_size = _check_int("image_size", image_size, 4)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, got `{type(seed).__name__}`.")
        self.strokes = _check_strokes(strokes)
        amounts = _check_amount("distortion", distortion), _check_amount("noise", noise)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"`dtype` must be a floating-point `torch.dtype`, got {dtype!r}.")
        self.seed = seed
        self.images, self.labels = self._generate(*amounts, dtype)

    def _generate(self, distortion: float, noise: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        gen = torch.Generator()
        gen.manual_seed(self.seed)
        e, (fewest, most) = self.examples_per_class, self.strokes
        control = _glyph_strokes(gen, self.num_classes, most, dtype).repeat_interleave(e, 0)
        count = torch.randint(fewest, most + 1, (self.num_classes, 1), generator=gen)
        ink = (torch.arange(most) < count).to(dtype).repeat_interleave(e, 0)  # (N, most): strokes in use
        points, sigma = _distort(gen, _bezier(control), distortion)
        images = _render(points, ink, sigma, self.image_size)
        images = (images + noise * torch.randn(images.shape, generator=gen, dtype=dtype)).clamp(0.0, 1.0)
        return images.unsqueeze(1), torch.arange(self.num_classes).repeat_interleave(e)

    def __len__(self) -> int:
        """Number of images, ``num_classes * examples_per_class``."""
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Return ``(image, label)``: a ``(1, image_size, image_size)`` tensor and an int.

        Raises:
            IndexError: If ``index`` is out of range.
        """
        index, size = operator.index(index), len(self)
        if not -size <= index < size:
            raise IndexError(f"`Glyphs` index {index} is out of range for {size} images.")
        return self.images[index], int(self.labels[index])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, examples_per_class={self.examples_per_class}, "
            f"image_size={self.image_size}, seed={self.seed})"
        )
