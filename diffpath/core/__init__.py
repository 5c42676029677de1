"""The maths, no I/O: schedules, the DDIM walk, moments, deterministic noise, SSIM."""
