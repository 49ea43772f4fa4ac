#!/usr/bin/env bash
# catalogue-cpu: one line per run; each resumes when run again.
# On a cluster replace --standalone by the scheduler's rendezvous (--nnodes, --rdzv-endpoint).
set -e
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/catalogue-cpu/configs/repa-seed0.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/catalogue-cpu/configs/repa-seed1.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/catalogue-cpu/configs/irepa-seed0.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/catalogue-cpu/configs/irepa-seed1.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/catalogue-cpu/configs/contrastive-seed0.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/catalogue-cpu/configs/contrastive-seed1.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/catalogue-cpu/configs/heun-seed0.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/catalogue-cpu/configs/heun-seed1.yaml
