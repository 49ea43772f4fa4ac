#!/usr/bin/env bash
# routing-deep-cpu: one line per run; each resumes when run again.
# On a cluster replace --standalone by the scheduler's rendezvous (--nnodes, --rdzv-endpoint).
set -e
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/routing-deep-cpu/configs/dense-seed0.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/routing-deep-cpu/configs/dense-seed1.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/routing-deep-cpu/configs/tread-seed0.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/routing-deep-cpu/configs/tread-seed1.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/routing-deep-cpu/configs/sprint-seed0.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/routing-deep-cpu/configs/sprint-seed1.yaml
