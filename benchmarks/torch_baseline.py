"""PyTorch CPU baseline of the JDCL joint UNet: python benchmarks/torch_baseline.py --config=digits

A PyTorch re-implementation of the network of JDCL_SPEC section 1 (ldm UNet with scale-shift norm,
GroupNorm32, legacy attention, strided-conv down / nearest+conv up, pooled-feature classifier),
written from the spec so that JAX and PyTorch can be timed on the same machine in the same session.
Parameter counts are asserted equal to jdcl_jax's. Benchmark-only: torch is not a project
dependency; without it the script prints {"skipped": ...} and exits 0.

Train step (as the reference measurement): eps-MSE on x_t at random t + 1e-3 * CE of the t = 0
classifier pass on a second view, backward, AdamW(2e-4, wd 0.01), LitEma update; train mode
(dropout 0.1), float32, 2 threads. Augmentation is not timed (the original runs it in DataLoader
workers). DDIM: one eta = 0 step (UNet forward, eval mode, no grad) and the t = 0 labelling pass.

Prints one JSON line: s/step (median of --repeats after warm-up), img/s, FLOPs per step counted by
torch.utils.flop_counter (matmul/conv/bmm only), torch.mm 2048^3 GFLOP/s measured in the same run,
DDIM step time, peak RSS, load average before and after.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

from hostinfo import host_cpu  # this script's folder is on sys.path

try:
  import torch
  import torch.nn.functional as F
  from torch import nn
except ImportError:  # benchmark-only dependency
  print("torch is not installed; `pip install torch` to run the PyTorch baseline",
        file=sys.stderr)
  print(json.dumps({"benchmark": "torch_baseline", "skipped": "torch not installed"}))
  sys.exit(0)

# name -> (model kwargs, parameter count (= jdcl_jax count_params), train batch, DDIM batch)
CONFIGS = {
    "tiny": (dict(image_size=16, in_ch=3, ch=32, mult=(1, 2, 2), num_res=2, attn_ds=(2,),
                  heads=4, hidden=64, num_classes=10), 1_777_517, 32, 64),
    "digits": (dict(image_size=8, in_ch=1, ch=32, mult=(1, 2), num_res=2, attn_ds=(2,),
                    heads=4, hidden=256, num_classes=10), 1_164_907, 64, 64),
    "cifar10": (dict(image_size=32, in_ch=3, ch=128, mult=(1, 2, 2, 2), num_res=3, attn_ds=(2, 4),
                     heads=4, hidden=1024, num_classes=10), 56_355_341, 8, 16),
}
T = 1000


# ----------------------------------------------------------------------------------------- model


def group_norm(c: int) -> nn.Module:
  return nn.GroupNorm(32, c, eps=1e-5)


def zeroed(m: nn.Module) -> nn.Module:
  for p in m.parameters():
    nn.init.zeros_(p)
  return m


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
  """[cos, sin] sinusoidal features, max period 10000."""
  half = dim // 2
  freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
  args = t.float()[:, None] * freqs[None]
  return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
  """GN-SiLU-conv, scale-shift norm from the embedding, SiLU-dropout-zero conv, skip."""

  def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
    super().__init__()
    self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
    self.emb = nn.Linear(emb_dim, 2 * c_out)
    self.norm2, self.drop = group_norm(c_out), nn.Dropout(dropout)
    self.conv2 = zeroed(nn.Conv2d(c_out, c_out, 3, padding=1))
    self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

  def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    h = self.conv1(F.silu(self.norm1(x)))
    scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
    h = self.norm2(h) * (1 + scale) + shift
    return self.skip(x) + self.conv2(self.drop(F.silu(h)))


class Attention(nn.Module):
  """Self-attention over pixels, legacy head split (heads before q/k/v), zero proj_out."""

  def __init__(self, c: int, heads: int):
    super().__init__()
    self.heads, self.norm = heads, group_norm(c)
    self.qkv = nn.Conv1d(c, 3 * c, 1)
    self.proj = zeroed(nn.Conv1d(c, c, 1))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, c, hh, ww = x.shape
    qkv = self.qkv(self.norm(x).reshape(b, c, hh * ww))
    d = c // self.heads
    q, k, v = qkv.reshape(b * self.heads, 3 * d, hh * ww).split(d, dim=1)
    s = d ** -0.25
    w = torch.softmax(torch.einsum("nct,ncs->nts", q * s, k * s).float(), dim=-1)
    a = torch.einsum("nts,ncs->nct", w.type(v.dtype), v).reshape(b, c, hh * ww)
    return x + self.proj(a).reshape(b, c, hh, ww)


class Down(nn.Module):
  def __init__(self, c: int):
    super().__init__()
    self.op = nn.Conv2d(c, c, 3, stride=2, padding=1)

  def forward(self, x):
    return self.op(x)


class Up(nn.Module):
  def __init__(self, c: int):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, padding=1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Block(nn.ModuleList):
  """A sequence of layers of which only ResBlocks see the time embedding."""

  def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    for layer in self:
      h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
    return h


class JointUNet(nn.Module):
  def __init__(self, image_size, in_ch, ch, mult, num_res, attn_ds, heads, hidden, num_classes,
               dropout=0.1):
    super().__init__()
    del image_size
    self.ch, emb = ch, 4 * ch
    self.time_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
    res = lambda a, b: ResBlock(a, b, emb, dropout)
    self.inputs = nn.ModuleList([Block([nn.Conv2d(in_ch, ch, 3, padding=1)])])
    widths, cur, ds = [ch], ch, 1
    for level, m in enumerate(mult):
      for _ in range(num_res):
        layers = [res(cur, m * ch)] + ([Attention(m * ch, heads)] if ds in attn_ds else [])
        cur = m * ch
        self.inputs.append(Block(layers))
        widths.append(cur)
      if level != len(mult) - 1:
        self.inputs.append(Block([Down(cur)]))
        widths.append(cur)
        ds *= 2
    self.middle = Block([res(cur, cur), Attention(cur, heads), res(cur, cur)])
    feat_dim, skips = sum(widths) + cur, list(widths)
    self.outputs = nn.ModuleList()
    for level, m in reversed(list(enumerate(mult))):
      for i in range(num_res + 1):
        layers = [res(cur + skips.pop(), m * ch)]
        cur = m * ch
        layers += [Attention(cur, heads)] if ds in attn_ds else []
        if level and i == num_res:
          layers.append(Up(cur))
          ds //= 2
        self.outputs.append(Block(layers))
    self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zeroed(nn.Conv2d(ch, in_ch, 3, padding=1)))
    self.classifier = nn.Sequential(nn.Linear(feat_dim, hidden), nn.LeakyReLU(0.2),
                                    nn.Dropout(dropout), nn.Linear(hidden, num_classes))

  def encode(self, x, emb):
    hs, h = [], x
    for block in self.inputs:
      h = block(h, emb)
      hs.append(h)
    hs.append(self.middle(h, emb))
    return hs

  def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """eps prediction of x_t at integer timesteps t."""
    emb = self.time_embed(sinusoid(t, self.ch))
    hs = self.encode(x, emb)
    h, skips = hs[-1], hs[:-1]
    for block in self.outputs:
      h = block(torch.cat([h, skips.pop()], dim=1), emb)
    return self.out(h)

  def classify(self, x: torch.Tensor) -> torch.Tensor:
    """Logits of the clean image: separate encoder + middle pass at t = 0, global pooling, MLP."""
    emb = self.time_embed(sinusoid(torch.zeros(x.shape[0]), self.ch))
    feats = torch.cat([h.mean(dim=(2, 3)) for h in self.encode(x, emb)], dim=1)
    return self.classifier(feats)


# ------------------------------------------------------------------------------------ train step


def alphas_cumprod() -> torch.Tensor:
  betas = torch.linspace(1e-3, 2e-2, T, dtype=torch.float64)   # "sqrt_linear" = linear betas
  return torch.cumprod(1 - betas, 0).float()


class Trainer:
  """Model, AdamW and LitEma-style EMA (decay min(0.9999, (1+n)/(10+n)))."""

  def __init__(self, model: JointUNet, foreach: bool):
    self.model, self.acp, self.foreach = model, alphas_cumprod(), foreach
    self.opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.01,
                                 foreach=foreach or None)
    self.params = [p for p in model.parameters()]
    self.ema = [p.detach().clone() for p in self.params]
    self.ema_n = 0

  def loss(self, x_diff, x_cls, y):
    t = torch.randint(0, T, (x_diff.shape[0],))
    noise = torch.randn_like(x_diff)
    a = self.acp[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x_diff + (1 - a).sqrt() * noise
    mse = F.mse_loss(self.model(x_t, t), noise)
    return mse + 1e-3 * F.cross_entropy(self.model.classify(x_cls), y)

  @torch.no_grad()
  def ema_update(self):
    self.ema_n += 1
    d = min(0.9999, (1 + self.ema_n) / (10 + self.ema_n))
    if self.foreach:
      torch._foreach_lerp_(self.ema, self.params, 1 - d)
    else:
      for e, p in zip(self.ema, self.params):
        e.sub_((1 - d) * (e - p))

  def step(self, x_diff, x_cls, y) -> float:
    self.opt.zero_grad(set_to_none=True)
    loss = self.loss(x_diff, x_cls, y)
    loss.backward()
    self.opt.step()
    self.ema_update()
    return loss.item()


# ------------------------------------------------------------------------------------- timing


def median_time(fn, repeats: int, warmup: int) -> tuple[float, float, float]:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), min(times), max(times)


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  a = torch.randn(n, n)
  sec, _, _ = median_time(lambda: torch.mm(a, a), repeats, warmup=2)
  return 2 * n ** 3 / sec / 1e9


def count_flops(fn) -> float:
  from torch.utils.flop_counter import FlopCounterMode
  with FlopCounterMode(display=False) as counter:
    fn()
  return float(counter.get_total_flops())


def ddim_step_fn(model: JointUNet, x: torch.Tensor):
  """One eta = 0 DDIM update x_t -> x_prev (t = 500 -> 496, i.e. 250 of 1000 steps)."""
  acp = alphas_cumprod()
  t = torch.full((x.shape[0],), 500, dtype=torch.long)
  a_t, a_prev = acp[500], acp[496]

  @torch.no_grad()
  def step():
    e = model(x, t)
    x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
  return step


def bench_ddim(model, kw, batch, repeats) -> dict:
  model.eval()
  x = torch.randn(batch, kw["in_ch"], kw["image_size"], kw["image_size"])
  step = ddim_step_fn(model, x)
  sec, lo, hi = median_time(step, repeats, warmup=1)
  with torch.no_grad():
    label_sec, _, _ = median_time(lambda: model.classify(x).argmax(-1), repeats, warmup=1)
    fwd_flops = count_flops(lambda: model(x, torch.zeros(batch, dtype=torch.long)))
  model.train()
  return {"ddim_batch": batch, "sec_per_ddim_step": sec, "ddim_step_min_max": [lo, hi],
          "ddim250_images_per_sec": batch / (250 * sec), "label_pass_sec": label_sec,
          "unet_fwd_gflop_per_img": fwd_flops / batch / 1e9}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", choices=sorted(CONFIGS), required=True)
  ap.add_argument("--batch", type=int, default=0, help="0 = the config's benchmark batch")
  ap.add_argument("--ddim-batch", type=int, default=0, help="0 = the config's DDIM batch")
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--ddim-repeats", type=int, default=10)
  ap.add_argument("--skip-ddim", action="store_true")
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--foreach", action="store_true",
                  help="multi-tensor AdamW and EMA (default: per-tensor, torch's CPU default)")
  a = ap.parse_args()
  load_before = os.getloadavg()
  torch.set_num_threads(a.threads)
  torch.manual_seed(0)
  kw, expected, batch, ddim_batch = CONFIGS[a.config]
  batch, ddim_batch = a.batch or batch, a.ddim_batch or ddim_batch
  model = JointUNet(**kw).train()
  n_params = sum(p.numel() for p in model.parameters())
  assert n_params == expected, f"{a.config}: {n_params:,} parameters, jdcl_jax has {expected:,}"
  trainer = Trainer(model, a.foreach)
  shape = (batch, kw["in_ch"], kw["image_size"], kw["image_size"])
  x_diff, x_cls = torch.rand(shape) * 2 - 1, torch.rand(shape) * 2 - 1
  y = torch.arange(batch) % kw["num_classes"]
  step = lambda: trainer.step(x_diff, x_cls, y)
  sec, lo, hi = median_time(step, a.repeats, a.warmup)
  flops = count_flops(lambda: trainer.loss(x_diff, x_cls, y).backward())
  trainer.opt.zero_grad(set_to_none=True)
  ddim = {} if a.skip_ddim else bench_ddim(model, kw, ddim_batch, a.ddim_repeats)
  mm = matmul_gflops()
  print(json.dumps({
      "benchmark": "torch_baseline", "config": a.config, "batch": batch, "params": n_params,
      "torch": torch.__version__, "threads": torch.get_num_threads(), "foreach": a.foreach,
      "sec_per_step": sec, "step_min_max": [lo, hi], "repeats": a.repeats,
      "images_per_sec": batch / sec, "gflop_per_step": flops / 1e9,
      "achieved_gflops": flops / sec / 1e9, "matmul_gflops": mm,
      "fraction_of_matmul": flops / sec / 1e9 / mm, **ddim,
      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
      **host_cpu()}))


if __name__ == "__main__":
  main()
