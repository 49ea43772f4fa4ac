"""One training step and what it is built from: the run's parts from a config (`build`),
every loss term and the optimizer step (`step`), the optimizers (`optim`), the EMA
(`ema`) and a checkpoint's model sampling images for prompts (`inference`)."""
