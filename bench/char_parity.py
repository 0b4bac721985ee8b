"""shakespeare_char side by side: the PyTorch peer (nanoGPT's GPT and recipe) trained on our
pipeline's batches, or with nanoGPT's own get_batch (--batches nanogpt: torch.randint offsets,
seeded 1337 + seed, from the same training tokens), and scored on the whole validation split
exactly as train.main scores ours."""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from bench.train import peer_model
from configs.experiments import shakespeare_char
from data import corpus
from data.pipeline import eval_batches, pretrain_iterator
from data.prepare import TokenShards
from train.stage import section


def nanogpt_batches(train_dir: str, block: int, batch: int, seed: int):
  """nanoGPT's get_batch: `batch` offsets drawn with replacement by torch.randint each step."""
  shards = TokenShards(train_dir)
  data = shards.read(0, shards.num_tokens).astype(np.int64)
  gen = torch.Generator().manual_seed(seed)
  while True:
    ix = torch.randint(len(data) - block, (batch,), generator=gen).numpy()
    rows = np.stack([data[i : i + block + 1] for i in ix])
    yield {"inputs": rows[:, :-1], "targets": rows[:, 1:]}


def _xy(b):
  return b["inputs"], b["targets"]


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--steps", type=int, default=2000)
  ap.add_argument("--seed", type=int, default=0, help="torch init seed")
  ap.add_argument("--data_seed", type=int, default=0, help="our pipeline's shuffling seed")
  ap.add_argument(
    "--estimates",
    type=int,
    default=0,
    help="also print this many of nanoGPT's estimate_loss (20 random batches "
    "each) and one over 1000 batches, to show that estimate's spread",
  )
  ap.add_argument(
    "--batches",
    choices=("ours", "nanogpt"),
    default="ours",
    help="our pipeline's shuffled windows, or nanoGPT's random offsets",
  )
  ap.add_argument(
    "--vocab",
    choices=("tokenizer", "chars"),
    default="tokenizer",
    help="tokenizer: our char vocabulary, the text's characters plus 7 control ids "
    "it never uses; chars: nanoGPT's, the characters alone (the control rows "
    "are dropped after init, so every other initial weight is the same)",
  )
  args = ap.parse_args()
  c = shakespeare_char.get_config()
  data_cfg = section(corpus.DataConfig, c.data, "data")
  tok, train_dir, val_dir = corpus.build(
    data_cfg, "/tmp/fromscratch_bench_shakespeare_char", progress=False
  )
  model = peer_model(c.model, vocab=tok.vocab_size, seed=args.seed)
  if args.vocab == "chars":
    # from_pretrained draws nothing from torch's RNG, so the two vocabularies stay paired.
    model.wte = torch.nn.Embedding.from_pretrained(
      model.wte.weight.data[: len(tok.chars)].clone(), freeze=False
    )
  decay = [p for p in model.parameters() if p.dim() >= 2]  # nanoGPT's two parameter groups
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  opt = torch.optim.AdamW(
    [
      {"params": decay, "weight_decay": c.opt.weight_decay},
      {"params": no_decay, "weight_decay": 0.0},
    ],
    lr=c.opt.lr,
    betas=(c.opt.b1, c.opt.b2),
  )

  def lr_at(it):  # nanoGPT train.py get_lr
    if it < c.opt.warmup_steps:
      return c.opt.lr * (it + 1) / (c.opt.warmup_steps + 1)
    ratio = min((it - c.opt.warmup_steps) / (args.steps - c.opt.warmup_steps), 1.0)
    return c.opt.final_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (c.opt.lr - c.opt.final_lr)

  if args.batches == "ours":
    it = pretrain_iterator(
      train_dir,
      seq_len=data_cfg.seq_len,
      batch_size=data_cfg.batch_size,
      seed=args.data_seed,
      window_stride=data_cfg.window_stride,
    )
  else:
    it = nanogpt_batches(train_dir, data_cfg.seq_len, data_cfg.batch_size, 1337 + args.seed)
  t0 = time.perf_counter()
  for step in range(args.steps):
    for group in opt.param_groups:
      group["lr"] = lr_at(step)
    b = next(it)
    loss = model(torch.from_numpy(b["inputs"]).long(), torch.from_numpy(b["targets"]).long())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), c.opt.clip_norm)
    opt.step()
  train_s = time.perf_counter() - t0
  model.eval()
  total, count = 0.0, 0.0
  with torch.no_grad():
    for b in eval_batches(val_dir, seq_len=data_cfg.seq_len, batch_size=data_cfg.eval_batch_size):
      w = torch.from_numpy(b["loss_mask"])
      real = w > 0  # padding rows carry pad ids; feed id 0 there, weight 0
      x = torch.where(real, torch.from_numpy(b["inputs"]).long(), 0)
      y = torch.where(real, torch.from_numpy(b["targets"]).long(), 0)
      s, n = model(x, y, w)
      total, count = total + float(s), count + float(n)
  if args.estimates:
    val = nanogpt_batches(val_dir, data_cfg.seq_len, data_cfg.batch_size, 1337)
    with torch.no_grad():
      est = [
        np.mean([float(model(*map(torch.from_numpy, _xy(next(val))))) for _ in range(20)])
        for _ in range(args.estimates)
      ]
      big = np.mean([float(model(*map(torch.from_numpy, _xy(next(val))))) for _ in range(1000)])
    print(
      "nanoGPT estimate_loss (20 batches) x",
      args.estimates,
      ":",
      " ".join(f"{e:.4f}" for e in est),
      f"; over 1000 batches: {big:.4f}",
    )
  data = f"data seed {args.data_seed}" if args.batches == "ours" else "nanoGPT's get_batch"
  print(
    f"pytorch peer, seed {args.seed}, {data}, vocab {model.wte.weight.shape[0]}: "
    f"val loss {total / count:.4f} over the whole validation split at {args.steps} steps "
    f"({train_s:.0f} s training)"
  )


if __name__ == "__main__":
  main()
