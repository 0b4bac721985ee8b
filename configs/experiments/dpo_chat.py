"""DPO on preference pairs from the SFT model: the policy starts from the workdir of
sft_shakespeare (or any given with --config.train.init_from=DIR), which is also the reference
whose logprobs are computed once, before training; the pairs come with --config.data.path."""

import ml_collections

from configs import base


def get_config():
  c = base.get_config()
  c.stage = "rlhf.dpo"
  # Started from weights, the model keeps their architecture: only how it runs is set here.
  c.model = base.runtime_model(dropout=0.0)
  c.data = ml_collections.ConfigDict()
  # Preference JSONL: {"prompt", "chosen", "rejected"} (prompt a string or a messages list) or
  # Anthropic HH {"chosen", "rejected"} transcripts (any "margin" is ignored by DPO). Files, a
  # directory or a glob.
  c.data.path = ""
  c.data.val_path = ""  # held-out pairs; "" holds out val_fraction of data.path
  c.data.val_fraction = 0.05  # share of data.path held out when val_path is ""
  c.data.tokenizer = "bpe"  # only from scratch (no init_from): char | bpe | unigram
  c.data.vocab_size = 2048  # only from scratch, for bpe and unigram
  c.data.seq_len = 256  # tokens of prompt + response a row holds (inputs, shifted by one)
  c.data.batch_size = 32  # pairs per optimizer step (2x as many rows in the forward)
  # Pairs per evaluation batch, and per batch of the reference's one pass over all pairs.
  c.data.eval_batch_size = 64
  # Pairs longer than seq_len: drop (a truncated response would be scored without its end) |
  # truncate (keep the start). Both are counted and logged.
  c.data.overflow = "drop"
  c.data.seed = 0  # shuffling and held-out split seed
  c.data.worker_count = 0  # grain worker processes

  c.rlhf = ml_collections.ConfigDict()
  # sigmoid: -(1 - eps) log sigmoid(beta D) - eps log sigmoid(-beta D) (DPO, with label
  # smoothing eps) | ipo: (D - 1 / (2 beta))^2; D = (logpi_c - logref_c) - (logpi_r - logref_r).
  c.rlhf.loss = "sigmoid"
  c.rlhf.beta = 0.1  # strength of the KL to the reference: larger keeps the policy closer
  c.rlhf.label_smoothing = 0.0  # eps: the share of labels assumed flipped (sigmoid loss only)
  # Coefficient of the chosen responses' NLL (per pair, the mean over its chosen tokens) added
  # to the loss: keeps chosen logprobs from falling (RPO); 0 turns it off.
  c.rlhf.nll_coef = 0.0

  c.opt.lr = 5e-6  # DPO's usual fine-tuning rate: larger rates drift from the reference fast
  c.opt.final_lr = 5e-7  # cosine decay to this at train.steps
  c.opt.warmup_steps = 50  # linear warmup steps
  c.opt.b2 = 0.99  # Adam's second-moment decay, as SFT's
  c.train.init_from = (
    "runs/sft"  # the SFT workdir (sft_shakespeare's --workdir): policy and reference
  )
  c.train.steps = 1000  # about one epoch of 32k pairs
  c.train.eval_every = 100  # steps between held-out loss, reward margin and accuracy
  c.train.eval_batches = 0  # every held-out pair
  c.train.checkpoint_every = 250  # steps between checkpoints
  return c
