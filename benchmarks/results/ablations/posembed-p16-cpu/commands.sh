#!/usr/bin/env bash
# posembed-p16-cpu: one line per run; each resumes when run again.
# On a cluster replace --standalone by the scheduler's rendezvous (--nnodes, --rdzv-endpoint).
set -e
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/posembed-p16-cpu/configs/rope-seed0.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/posembed-p16-cpu/configs/rope-seed1.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/posembed-p16-cpu/configs/sincos-seed0.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/posembed-p16-cpu/configs/sincos-seed1.yaml
