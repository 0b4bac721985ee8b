"""A reward model for RLHF: the SFT model's trunk with a scalar head, trained with
Bradley-Terry on preference pairs (Anthropic HH transcripts or prompt/chosen/rejected JSONL)
and normalised on the SFT policy's samples. Starts from the workdir of sft_shakespeare (or any
given with --config.train.init_from=DIR); the pairs come with --config.data.path."""

import ml_collections

from configs import base


def get_config():
  c = base.get_config()
  c.stage = "rlhf.reward"
  # Started from weights, the model keeps their architecture: only how it runs is set here.
  c.model = base.runtime_model(dropout=0.0)
  c.data = ml_collections.ConfigDict()
  # Preference JSONL: {"prompt", "chosen", "rejected"} (prompt a string or a messages list) or
  # Anthropic HH {"chosen", "rejected"} transcripts, each with an optional number "margin" by
  # which chosen's reward should exceed rejected's (default 0). Files, a directory or a glob.
  c.data.path = ""
  c.data.val_path = ""  # held-out pairs; "" holds out val_fraction of data.path
  c.data.val_fraction = 0.05  # share of data.path held out when val_path is ""
  c.data.tokenizer = "bpe"  # only from scratch (no init_from): char | bpe | unigram
  c.data.vocab_size = 2048  # only from scratch, for bpe and unigram
  c.data.seq_len = 256  # tokens of prompt + response a row holds
  c.data.batch_size = 32  # pairs per optimizer step (2x as many rows in the forward)
  c.data.eval_batch_size = 64  # pairs per evaluation batch
  # Pairs longer than seq_len: drop (TRL's choice: a truncated response is scored mid-way) |
  # truncate (keep the start). Both are counted and logged.
  c.data.overflow = "drop"
  c.data.seed = 0  # shuffling and held-out split seed
  c.data.worker_count = 0  # grain worker processes

  c.rlhf = ml_collections.ConfigDict()
  # The policy whose samples set the normalisation (gain and bias stored with every
  # checkpoint, so its samples score mean 0 and std 1): the SFT workdir PPO starts from.
  # "": no normalisation (gain 1, bias 0).
  c.rlhf.norm_policy = "runs/sft"
  c.rlhf.norm_prompts = ""  # prompt JSONL ({"prompt": ...} lines); "": the training pairs'
  c.rlhf.norm_samples = 256  # responses sampled (once, in one batch) to fit gain and bias
  c.rlhf.norm_temperature = 1.0  # sampling temperature of those responses
  c.rlhf.norm_tokens = 64  # most tokens in such a response (it ends at <|end|>)
  c.rlhf.norm_seed = 0  # sampling key of those responses

  c.opt.lr = 1e-4  # a fine-tuning rate: the trunk is trained, the head is new
  c.opt.final_lr = 1e-5  # cosine decay to this at train.steps
  c.opt.warmup_steps = 20  # linear warmup steps
  c.opt.b2 = 0.99  # Adam's second-moment decay, as SFT's
  c.train.init_from = "runs/sft"  # the SFT workdir (sft_shakespeare's --workdir)
  # About one epoch of 32k pairs: reward models overfit past one (InstructGPT trains one).
  c.train.steps = 1000
  c.train.eval_every = 100  # steps between held-out accuracy and reward gap
  c.train.eval_batches = 0  # every held-out pair
  c.train.checkpoint_every = 250  # each checkpoint refits the normalisation
  return c
