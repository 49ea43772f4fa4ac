"""Measuring a model: images for held-out captions against real ones (`evaluate`, `heldout`),
the distances between image sets (`metrics`, FID's `inception`), the real images' cached side
(`real_stats`), the shapes score
(`shapes_score`) and the validation loss by noise level (`validation`)."""
