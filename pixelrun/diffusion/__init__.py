"""Diffusion on pixels: the x-prediction flow-matching objective and its time convention
(`objective`), the per-sample random draws of a training step (`draws`), the Euler sampler with
classic and self guidance (`sampling`), and images for prompts with a config's sampler (`generate`)."""
