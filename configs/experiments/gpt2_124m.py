"""GPT-2 small (124M): the released GPT-2's architecture (biases included), trained with
nanoGPT's train_gpt2 optimizer and batch recipe: batches of 480 x 1024 tokens (about 0.5M;
5 accumulated microbatches of 96 rows, 12 per device on 8 GPUs), lr 6e-4 with 2000 warmup
steps and cosine decay to 6e-5 over 600k steps, AdamW betas 0.9/0.95, weight decay 0.1 on
every matrix (embeddings included), clip 1.0, bf16 matmuls. Each evaluation scores 2400 rows
(nanoGPT's 200 batches of 12). nanoGPT itself trains without biases (102,144 fewer parameters).

The model's vocabulary is GPT-2's 50257 padded to 50304 (as nanoGPT does), so the model is
124M parameters whatever tokenizer feeds it: rows past the tokenizer's size are never input.
For a real run set data.corpus=shards and data.path to a directory made by
`python -m data.prepare` (a tokenizer of up to 50304 pieces). On the built-in corpus it runs
with an 8192-piece tokenizer, but the whole corpus is about three of these batches."""

from configs import base


def get_config():
  c = base.get_config()
  c.model = base.model_config("gpt2_124m", vocab_size=50304, dtype="bfloat16")
  c.data.vocab_size = 8192
  c.data.seq_len = 1024
  c.data.batch_size = 480
  c.data.eval_batch_size = 96
  c.opt.grad_accum = 5
  c.opt.lr = 6e-4
  c.opt.final_lr = 6e-5
  c.opt.warmup_steps = 2000
  c.opt.b2 = 0.95
  c.opt.weight_decay = 0.1
  c.opt.decay_embeddings = True
  c.mesh.layout = "fsdp"
  c.train.steps = 600000
  c.train.eval_every = 1000
  c.train.eval_batches = 25
  c.train.checkpoint_every = 1000
  return c
