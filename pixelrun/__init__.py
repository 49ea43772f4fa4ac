"""pixelrun: pixel-space text-to-image diffusion training."""
