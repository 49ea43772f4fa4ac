"""Diffusion on pixels: the x-prediction flow-matching objective and its time convention
(`objective`), the per-sample random draws of a training step (`draws`) and the Euler sampler with
classic and self guidance (`sampling`)."""
