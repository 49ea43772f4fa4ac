"""One training step and what it is built from: the run's parts from a config (`build`),
every loss term and the optimizer step (`step`), the optimizers (`optim`) and their learning-rate
schedule (`schedule`), and the EMA (`ema`)."""
