"""Where a training step's time goes on a GPU: phases (noise draws, forward, backward, clipping,
optimizer) timed with CUDA syncs, then the top kernels from torch.profiler. The 1.2B `small` preset,
blocks compiled, bf16, AdamW, random text embeddings (as `pixelrun bench`).

Usage: python benchmarks/profile_step.py [RESOLUTION] [BATCH] [extra overrides...]"""

import sys
import time

import torch

from pixelrun.config import load_config
from pixelrun.data import Batch
from pixelrun.diffusion.draws import step_draws
from pixelrun.infra.distributed import clip_gradients
from pixelrun.model.denoiser import compile_blocks, model_from_config
from pixelrun.training.optim import make_optimizer
from pixelrun.training.step import compute_losses

res = int(sys.argv[1]) if len(sys.argv) > 1 else 512
b = int(sys.argv[2]) if len(sys.argv) > 2 else 32
cfg = load_config(None, ["model.preset=small", f"data.resolution={res}", f"train.batch_size={b}", *sys.argv[3:]])
dev = torch.device("cuda")
model = model_from_config(cfg, 2304).to(dev)
compile_blocks(model)
opt, _ = make_optimizer(model, cfg)
params = [p for g in opt.param_groups for p in g["params"]]
batch = Batch(torch.randint(0, 256, (b, 3, res, res), dtype=torch.uint8, device=dev), [""] * b)
text = torch.randn(b, 256, 2304, device=dev)
mask = torch.ones(b, 256, dtype=torch.bool, device=dev)


def step(i, phases=None):
    def mark(name):
        if phases is not None:
            torch.cuda.synchronize()
            now = time.perf_counter()
            phases[name] = phases.get(name, 0.0) + now - mark.t
            mark.t = now

    mark.t = time.perf_counter()
    noise = step_draws(cfg, i, list(range(b)), (3, res, res), 32, dev)
    mark("noise draws")
    r = compute_losses(model, batch, text, mask, text[:1] * 0, mask[:1], noise, cfg, dev)
    mark("forward + loss")
    r.loss.backward()
    mark("backward")
    clip_gradients(params, 1.0)
    mark("clip")
    opt.step()
    opt.zero_grad(set_to_none=True)
    mark("optimizer")


for i in range(4):
    step(i)
torch.cuda.synchronize()
phases, n = {}, 6
for i in range(n):
    step(10 + i, phases)
total = sum(phases.values()) / n
print(f"small {res}px batch {b} routing {cfg.routing.ratio}: {total * 1e3:.1f} ms/step")
for k, v in phases.items():
    print(f"  {k:<16}{v / n * 1e3:8.1f} ms  {v / n / total:6.1%}")

from torch.profiler import ProfilerActivity, profile  # noqa: E402

with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for i in range(3):
        step(20 + i)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
