"""The training tricks, one module each: the flow objective's term (`flow`), contrastive flow
matching (`contrastive`), REPA and iREPA's projectors and spatial normalisation (`repa`), the
perceptual terms LPIPS and P-DINO (`perceptual`) and TREAD routing (`routing`). A trick's module
holds the networks it builds, its FLOPs, its loss term and its description line; `table` lists the
terms a step sums, in order. A new trick is one new module and one line in `table.TERMS`."""
