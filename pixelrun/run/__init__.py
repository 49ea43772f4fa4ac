"""A training run end to end: stages, resume and the cadence of logs, grids, evaluations and
checkpoints around the step (`train`), and the same run rehearsed at laptop size (`rehearse`)."""
