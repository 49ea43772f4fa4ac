"""The denoiser and what it is made of: the transformer (`denoiser`), TREAD token routing
(`routing`), the frozen text encoders and their caption cache (`text`), and the analytic cost of a
training image (`flops`). Nothing here knows about diffusion or training."""
