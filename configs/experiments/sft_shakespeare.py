"""SFT of the Shakespeare demo's model into a Shakespearean chat partner: it answers a speech
as the next speaker of the plays would. Starts from that demo's workdir (make
demo-shakespeare), or any workdir given with --config.train.init_from=DIR; its own chats with
--config.data.path."""

import ml_collections

from configs import base


def get_config():
  c = base.get_config()
  c.stage = "train.sft"
  # Started from weights, the model keeps their architecture: only how it runs is set here.
  c.model = base.runtime_model(dropout=0.0)
  c.data = ml_collections.ConfigDict()
  # Chat JSONL ({"messages": [...]} or {"prompt", "response"} per line: files, a directory or
  # a glob), or "shakespeare": the built-in dialogue of the plays (a speech, then the reply).
  c.data.path = "shakespeare"
  c.data.val_path = ""  # held-out chats; "" holds out val_fraction of data.path
  c.data.val_fraction = 0.05  # share of data.path held out when val_path is ""
  c.data.tokenizer = "bpe"  # only from scratch (no init_from): char | bpe | unigram
  c.data.vocab_size = 2048  # only from scratch, for bpe and unigram
  c.data.seq_len = 128  # tokens per packed training row
  c.data.batch_size = 16  # rows per optimizer step
  c.data.eval_batch_size = 64  # rows per evaluation batch
  c.data.pack = True  # several chats to a row (each its own segment: no cross-attention)
  c.data.overflow = "truncate"  # chats longer than seq_len: truncate | drop (both counted)
  c.data.seed = 0  # shuffling and held-out split seed
  c.data.worker_count = 0  # grain worker processes
  c.data.eval_replies = 4  # held-out prompts answered greedily at each evaluation
  c.data.reply_tokens = 64  # most tokens in such a reply
  c.opt.lr = 5e-4
  c.opt.final_lr = 5e-5
  c.opt.warmup_steps = 20
  c.opt.b2 = 0.99
  c.train.init_from = "runs/demo"
  c.train.steps = 400
  c.train.eval_every = 100
  c.train.eval_batches = 10
  c.train.checkpoint_every = 100
  return c
