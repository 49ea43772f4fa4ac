"""One training step and what it is built from: the run's parts from a config (`build`), the
loss terms of the tricks summed and the optimizer step (`step`), the FLOPs of a config (`flops`),
the optimizers (`optim`) and their learning-rate schedule (`schedule`), and the EMA (`ema`)."""
