#!/usr/bin/env bash
# perceptual-cpu: one line per run; each resumes when run again.
# On a cluster replace --standalone by the scheduler's rendezvous (--nnodes, --rdzv-endpoint).
set -e
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/perceptual-cpu/configs/default-seed0.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/perceptual-cpu/configs/default-seed1.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/perceptual-cpu/configs/lpips-seed0.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/perceptual-cpu/configs/lpips-seed1.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/perceptual-cpu/configs/pdino-seed0.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/perceptual-cpu/configs/pdino-seed1.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/perceptual-cpu/configs/both-seed0.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/perceptual-cpu/configs/both-seed1.yaml
