#!/usr/bin/env bash
# muon-cpu: one line per run; each resumes when run again.
# On a cluster replace --standalone by the scheduler's rendezvous (--nnodes, --rdzv-endpoint).
set -e
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/muon-cpu/configs/adamw-seed0.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/muon-cpu/configs/adamw-seed1.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/muon-cpu/configs/adamw-2e-3-seed0.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/muon-cpu/configs/adamw-2e-3-seed1.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/muon-cpu/configs/muon-seed0.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/muon-cpu/configs/muon-seed1.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/muon-cpu/configs/muon-3e-3-seed0.yaml
torchrun --standalone --nproc_per_node=1 -m pixelrun train --config runs/ablations/muon-cpu/configs/muon-3e-3-seed1.yaml
