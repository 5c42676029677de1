"""Counter-based deterministic Gaussian noise, and content keys of images.

:func:`gaussian_noise` is counter-based: every value is a pure function of (seed, key, t, pixel
index), computed with integer tensor operations on the device. The mixing function is the
32-bit "lowbias32" integer hash (xorshift-multiply, constants 0x7feb352d and 0x846ca68b, found by
C. Wellons' hash-prospector), evaluated in int64 tensors with the multiplication split into 16-bit
limbs so that every intermediate stays below 2^49 (no signed overflow on any backend). A 64-bit
state (two 32-bit lanes) per (seed, key, t) is absorbed with the pixel index; three 32-bit words
per pixel give a 53-bit uniform u1 and a 32-bit uniform u2 for Box–Muller in float64,
z = √(−2 ln u1)·cos(2π u2), returned as float32. The integer part is bit-identical on every
device; only the float64 log/cos may differ in the last ulp before the float32 rounding.

The noise of DiffPathV2 (:mod:`diffpath.methods.diffpathv2`) is keyed by (seed, image key, t, pixel),
so an image gets the same noise whatever batch, order, split or device it is computed in.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["image_keys", "gaussian_noise", "noise_lanes", "lane_noise"]

# --------------------------------------------------------------------------------------------
# integer hashing on int64 tensors holding 32-bit words

_M32 = 0xFFFFFFFF
_M31 = 0x7FFFFFFF
_M16 = 0xFFFF
# lane initialisers and word tweaks: arbitrary odd 32-bit constants (fractional parts of √2, √3,
# √5, √7, and the golden ratio)
_LANE_A = 0x6A09E667
_LANE_B = 0xBB67AE85
_GOLDEN = 0x9E3779B9
_WORD_TWEAKS = (0x3C6EF372, 0xA54FF53A, 0x510E527F)
_KEY_SALTS = (0x9B05688C, 0x1F83D9AB)


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x·m) mod 2^32 for 32-bit words x held in int64; m is split into 16-bit limbs so that
    every product stays below 2^48."""
    lo, hi = m & _M16, (m >> 16) & _M16
    return (x * lo + (((x * hi) & _M16) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32: a bijective avalanche mix of 32-bit words."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _absorb(h: torch.Tensor, w: torch.Tensor | int) -> torch.Tensor:
    """Fold one 32-bit word into a 32-bit state."""
    return _mix32(((h ^ w) + _GOLDEN) & _M32)


def _split64(v: torch.Tensor | int) -> tuple[Any, Any]:
    """Low and high 32-bit words of a 64-bit (two's complement) integer or int64 tensor."""
    if isinstance(v, torch.Tensor):
        return v & _M32, (v >> 32) & _M32
    v = int(v) & 0xFFFFFFFFFFFFFFFF
    return v & _M32, v >> 32


# --------------------------------------------------------------------------------------------
# content keys and noise


def image_keys(x0: torch.Tensor) -> torch.Tensor:
    """Content keys of images: (B,) int64 in [0, 2^62), on ``x0``'s device.

    Each image is quantised to 8-bit levels q = round((x0 + 1)·127.5) clipped to [0, 255], so any
    float perturbation that does not move a pixel across a level boundary leaves the key unchanged.
    The key is two independent 31-bit hashes of the sequence of (pixel position, level) pairs:
    per lane, Σ_j mix(r_j ⊕ q_j) with a pseudo-random 32-bit r_j per position, summed exactly in
    int64 (each term < 2^32, so exact for fewer than 2^31 pixels per image) and mixed down.
    Vectorised over the batch; identical on every device (integer arithmetic only).

    Args:
        x0: (B, C, H, W) images in [-1, 1].
    """
    if x0.ndim < 2:
        raise ValueError(f"expected a batch of images (B, ...), got shape {tuple(x0.shape)}")
    B = x0.shape[0]
    q = torch.round((x0.detach().to(torch.float32) + 1.0) * 127.5).clamp_(0, 255)
    q = q.to(torch.int64).reshape(B, -1)
    n = q.shape[1]
    if n >= 2**31:
        raise ValueError("images with 2^31 or more values are not supported")
    pos = torch.arange(n, dtype=torch.int64, device=q.device)
    halves = []
    for salt in _KEY_SALTS:
        r = _mix32(_absorb(torch.full_like(pos, salt), pos))  # (n,) per-position words
        total = _mix32(r.unsqueeze(0) ^ q).sum(dim=1)  # (B,) exact, < n·2^32
        lo, hi = _split64(total)
        halves.append(_absorb(_mix32(hi), lo) & _M31)
    return (halves[0] << 31) | halves[1]


def gaussian_noise(
    keys: torch.Tensor, t: int, shape: tuple[int, int, int], seed: int
) -> torch.Tensor:
    """Deterministic standard normal noise per (seed, key, t, pixel).

    Args:
        keys: (B,) int64 image keys (content keys from :func:`image_keys` or global indices).
        t: the (original) timestep, a non-negative integer below 2^32.
        shape: (C, H, W) of one image.
        seed: any Python integer (taken modulo 2^64).

    Returns:
        (B, C, H, W) float32 on ``keys``' device. Row b depends only on (seed, keys[b], t): it is
        the same whatever else is in the batch, and the same on CPU and CUDA up to the float64
        rounding of log/cos before the cast to float32.
    """
    keys = torch.as_tensor(keys)
    if keys.ndim != 1:
        raise ValueError(f"keys must be a (B,) tensor, got shape {tuple(keys.shape)}")
    if keys.dtype.is_floating_point or keys.dtype == torch.bool:
        raise ValueError(f"keys must be integers, got {keys.dtype}")
    t = int(t)
    if not 0 <= t < 2**32:
        raise ValueError(f"t must lie in [0, 2^32), got {t}")
    C, H, W = (int(s) for s in shape)
    n = C * H * W
    if n >= 2**32:
        raise ValueError("too many values per image")
    lane_a, lane_b = noise_lanes(keys.to(torch.int64), t, seed)
    return lane_noise(lane_a, lane_b, n).reshape(keys.shape[0], C, H, W)


def noise_lanes(keys: torch.Tensor, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two 32-bit lanes, each (B,) int64, of the state per (seed, key, t)."""
    s_lo, s_hi = _split64(seed)
    k_lo, k_hi = _split64(keys)
    lanes = []
    for init in (_LANE_A, _LANE_B):
        h = torch.full_like(keys, init)
        for word in (s_lo, s_hi, k_lo, k_hi, int(t)):
            h = _absorb(h, word)
        lanes.append(h)
    return lanes[0], lanes[1]


def lane_noise(lane_a: torch.Tensor, lane_b: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) float32 standard normals from (B,) lanes: the per-pixel part of
    :func:`gaussian_noise`, a function of tensors alone (so it compiles to one static graph)."""
    j = torch.arange(n, dtype=torch.int64, device=lane_a.device).unsqueeze(0)  # (1, n)
    pa = _absorb(lane_a.unsqueeze(1), j)  # (B, n)
    pb = _absorb(lane_b.unsqueeze(1), j)
    w0, w1, w2 = (_mix32(_absorb(pa, tweak) ^ pb) for tweak in _WORD_TWEAKS)
    # u1 ∈ (0, 1) with 53 random bits, u2 ∈ (0, 1) with 32
    u1 = (((w0 << 21) | (w1 >> 11)).to(torch.float64) + 0.5) * 2.0**-53
    u2 = (w2.to(torch.float64) + 0.5) * 2.0**-32
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    return z.to(torch.float32)
