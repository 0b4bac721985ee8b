"""Text classification on a language model (rasbt/LLMs-from-scratch chapter 6's spam
classifier, for any labels): the decoder's hidden state at each text's last token through a
new k-way head, with cross-entropy. Starts from a workdir or Hugging Face folder
(--config.train.init_from=DIR) and reads {text, label} JSONL (--config.data.path). With
--config.model.lora_rank=8 only LoRA adapters and the head train."""

import ml_collections

from configs import base


def get_config():
  c = base.get_config()
  c.stage = "train.classify"
  # Started from weights, the model keeps their architecture: only how it runs is set here.
  # lora_rank > 0 trains adapters on lora_targets (and the head) instead of every weight.
  c.model = base.runtime_model(dropout=0.0)
  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # JSONL of {"text": ..., "label": ...} (files, a directory or a glob)
  c.data.val_path = ""  # held-out texts; "" holds out val_fraction of data.path
  c.data.val_fraction = 0.1  # share of data.path held out when val_path is ""
  c.data.text_field = "text"  # the JSONL field of a text
  c.data.label_field = "label"  # the JSONL field of its class: a name or an id
  c.data.labels = ""  # class names in order, comma-separated; "": sorted names, or ids 0..max
  c.data.tokenizer = "bpe"  # only from scratch (no init_from): char | bpe | unigram
  c.data.vocab_size = 2048  # only from scratch, for bpe and unigram
  c.data.seq_len = 128  # tokens of a text read (longer texts are cut, and counted)
  c.data.batch_size = 16  # texts per optimizer step
  c.data.eval_batch_size = 64  # texts per evaluation batch
  c.data.seed = 0  # shuffling and held-out split seed
  c.data.worker_count = 0  # grain worker processes
  c.opt.lr = 1e-4
  c.opt.final_lr = 1e-5
  c.opt.warmup_steps = 20
  c.opt.weight_decay = 0.1
  c.train.init_from = "runs/demo"
  c.train.steps = 500
  c.train.eval_every = 100
  c.train.eval_batches = 0  # every held-out text is evaluated (accuracy, confusion matrix)
  c.train.checkpoint_every = 100
  return c
