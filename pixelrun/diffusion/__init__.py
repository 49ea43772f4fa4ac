"""Diffusion on pixels: the x-prediction flow-matching objective and its time convention
(`objective`) and the Euler sampler with classic and self guidance (`sampling`)."""
