"""One training step and what it is built from: the run's parts from a config (`build`), the
loss terms of the tricks summed and the optimizer step (`step`), the FLOPs of a config (`flops`),
the optimizers (`optim`), the EMA (`ema`) and a checkpoint's model sampling images for prompts
(`inference`)."""
