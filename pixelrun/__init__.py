"""pixelrun: pixel-space text-to-image diffusion training.

Imports flow one way, down these layers (tests/test_layers.py walks every import, function-level
ones included, and fails on an upward import or a cycle):

0. ``config``: the typed config tree, parsing, validation and the rules it validates with (model
   presets, the TREAD span rule, aspect buckets, the caption-field grammar, metric and sampler
   names); it imports no other pixelrun module.
1. leaves, each doing one thing and importing only ``config`` and other leaves: ``model``,
   ``objective``, ``routing``, ``sampling``, ``teachers``, ``text``, ``data``, ``images``,
   ``checkpoint``, ``distributed``, ``ema``, ``optim``, ``metrics``, ``flops``, ``shapes_score``,
   ``tracking``, ``stats``, ``locks``, ``config_reference`` (the generated configuration reference page).
2. building what a run is made of from a config: ``build`` (device and precision, model, batch
   source, text encoder, teachers and projector, optimizer and schedule, EMA, the checkpointed
   state) and ``heldout`` (the held-out captions and images evaluations compare against).
3. the steps: ``step`` (noise draws, every loss term by name, the optimizer step), ``inference``
   (a checkpoint's model and images for prompts) and ``validation`` (the loss by noise level).
4. the programs: ``train`` (the loop), ``evaluate``, ``bench``, ``projection``, ``rehearse``,
   ``export_diffusers``, ``ablate`` (variants at an equal budget, run by ``train``), ``report``
   (a run's or an ablation's report, from its folders).
5. ``cli`` (and ``__main__``).
"""
