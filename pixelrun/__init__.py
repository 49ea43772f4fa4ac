"""pixelrun: pixel-space text-to-image diffusion training.

The package is one folder per concern, and imports flow one way, down these layers
(tests/test_layers.py walks every import, function-level ones included, and fails on an upward
import or a cycle). A folder imports only from its own layer or lower ones:

0. ``config``: the typed config tree, parsing, validation and the rules it validates with (model
   presets, the TREAD span rule, aspect buckets, the caption-field grammar); it imports nothing
   else of pixelrun. ``config.reference`` generates the configuration reference page.
1. the parts, each knowing nothing of training: ``model`` (the denoiser, TREAD routing, text
   encoders, the analytic FLOPs), ``diffusion`` (the objective, the sampler, images for prompts),
   ``teachers`` (frozen networks whose features losses compare) and ``infra`` (processes and
   sharding, precision, devices, checkpoints, the typed run records, files written whole, folder
   locks, metric sinks, picture grids).
2. ``data`` (the sources of batches and the shard converter) and ``tricks`` (one module per
   training trick: its networks, FLOPs, loss term; the table of terms a step sums).
3. ``training``: what a run is made of, built from a config (``build``), one optimizer step with
   every enabled loss term by name (``step``), the checkpoint's stateful parts (``state``), the
   optimizers and their schedule, the EMA, and the FLOPs of a config.
4. what runs beside training: ``evaluation`` (held-out data, metrics, the shapes score, the
   validation loss) and ``tools`` (the bench, the wall-time forecast, the diffusers export).
5. ``run``: the training loop with its cadence of logs, evaluations and checkpoints, resuming,
   the records a run writes, and the rehearsal.
6. ``experiments``: ablations at an equal budget, their statistics and the reports.
7. ``cli`` (and ``__main__``).
"""
