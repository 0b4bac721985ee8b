"""The whole pipeline on two-digit addition (rlhf/tasks.py), one config per stage:
--config=configs/experiments/addition.py:STAGE with STAGE one of pretrain, sft, rm, ppo, dpo,
grpo. `make demo` (rlhf/demo.py) writes the task's files and runs every stage with these
settings; each stage's paths are set there, as flags would set them:

  pretrain  --config.data.path=DATA (token shards of the equations, python -m data.prepare)
  sft       --config.train.init_from=PRETRAINED --config.data.path=sft.jsonl
  rm        --config.train.init_from=SFT --config.data.path=pairs.jsonl
  ppo       --config.train.init_from=SFT --config.rlhf.reward=RM --config.rlhf.prompts=prompts.jsonl
  dpo       --config.train.init_from=SFT --config.data.path=pairs.jsonl
  grpo      --config.train.init_from=SFT --config.rlhf.prompts=prompts.jsonl
"""

from configs import base
from configs.experiments import dpo_chat, grpo_chat, ppo_chat, rm_hh, sft_shakespeare

STAGES = ("pretrain", "sft", "rm", "ppo", "dpo", "grpo")


def _quiet(c, steps: int):
  c.train.steps = steps
  c.train.log_every = max(1, steps // 20)
  c.train.eval_every = 0  # evaluated once, at the end
  c.train.checkpoint_every = 0  # checkpointed once, at the end
  c.train.tensorboard = True
  c.train.progress = False
  return c


def pretrain():
  c = base.get_config()
  c.model = base.model_config(
    "tiny",
    vocab_size=0,
    d_model=128,
    n_layers=4,
    n_heads=4,
    n_kv_heads=4,
    d_ff=512,
    max_seq_len=64,
  )
  c.data.corpus = "shards"
  c.data.path = ""  # the prepared equations
  c.data.tokenizer = "char"
  c.data.seq_len = 64
  c.data.batch_size = 32
  c.data.eval_batch_size = 64
  c.opt.lr = 3e-3
  c.opt.final_lr = 1e-4
  c.opt.warmup_steps = 50
  c.opt.b2 = 0.99
  c.opt.weight_decay = 0.0
  c.train.eval_batches = 4
  c.train.sample_prompt = "37+45="
  c.train.sample_tokens = 4
  c.mesh.grad_reduce = "flat"
  return _quiet(c, 800)


def sft():
  c = sft_shakespeare.get_config()
  c.data.path = ""  # sft.jsonl
  c.data.val_fraction = 0.02
  c.data.seq_len = 64
  c.data.batch_size = 32
  c.data.eval_batch_size = 64
  c.data.eval_replies = 4
  c.data.reply_tokens = 4
  c.opt.lr = 3e-4
  c.opt.final_lr = 3e-5
  c.opt.warmup_steps = 20
  c.train.init_from = ""  # the pretrained workdir
  c.train.eval_batches = 4
  c.mesh.grad_reduce = "flat"
  # The chat markers were never targets in pretraining: the first loss is ~10 nats, mostly
  # <|end|>'s. At 300 steps one seed of three still had a loss of 0.47 and answered half
  # of the problems without a carry wrong; at 600 it imitates the demonstrator (0.10).
  return _quiet(c, 600)


def rm():
  c = rm_hh.get_config()
  c.data.path = ""  # pairs.jsonl
  c.data.val_fraction = 0.1
  c.data.seq_len = 16
  c.data.batch_size = 64
  c.data.eval_batch_size = 128
  c.rlhf.norm_policy = ""  # normalised on the SFT policy's samples (set by the demo)
  c.rlhf.norm_samples = 256
  c.rlhf.norm_tokens = 4
  c.opt.lr = 1e-3
  c.opt.final_lr = 1e-4
  c.opt.warmup_steps = 20
  c.train.init_from = ""  # the SFT workdir
  c.train.eval_batches = 0
  c.mesh.grad_reduce = "flat"
  return _quiet(c, 1200)


def ppo():
  c = ppo_chat.get_config()
  c.rlhf.prompts = ""  # prompts.jsonl
  c.rlhf.reward = ""  # the reward model's workdir
  c.rlhf.max_prompt_len = 10
  c.rlhf.response_len = 5
  c.rlhf.batch_size = 128
  c.rlhf.epochs = 2
  c.rlhf.minibatches = 2
  c.rlhf.kl_controller = "fixed"
  c.rlhf.beta = 0.1
  c.rlhf.missing_eos_penalty = 1.0
  # The critic starts from the reward model and must first learn values, not scores: it
  # learns 10x faster than the policy (at the policy's rate its explained variance stayed
  # below 0 for most of the run, and the advantages were mostly its error).
  c.rlhf.critic_lr = 2e-4
  c.opt.lr = 2e-5
  c.opt.schedule = "cosine"  # the policy settles at the end instead of swinging between
  c.opt.final_lr = 2e-6  # over- and under-carrying at a constant rate
  c.train.init_from = ""  # the SFT workdir
  return _quiet(c, 100)


def dpo():
  c = dpo_chat.get_config()
  c.data.path = ""  # pairs.jsonl
  c.data.val_fraction = 0.05
  c.data.seq_len = 16
  c.data.batch_size = 32
  c.data.eval_batch_size = 128
  c.rlhf.beta = 0.1
  c.rlhf.nll_coef = 1.0  # holds the chosen answers' likelihood up
  c.opt.lr = 1e-5
  c.opt.final_lr = 1e-6
  c.opt.warmup_steps = 10
  c.train.init_from = ""  # the SFT workdir
  c.train.eval_batches = 0
  c.mesh.grad_reduce = "flat"
  return _quiet(c, 200)


def grpo():
  c = grpo_chat.get_config()
  c.rlhf.prompts = ""  # prompts.jsonl
  c.rlhf.reward = "rlhf.tasks:exact_match"
  c.rlhf.max_prompt_len = 10
  c.rlhf.response_len = 5
  c.rlhf.batch_size = 16
  c.rlhf.group_size = 8
  c.rlhf.beta = 0.02
  c.rlhf.missing_eos_penalty = 1.0
  c.opt.lr = 3e-5
  c.opt.final_lr = 3e-5
  c.train.init_from = ""  # the SFT workdir
  return _quiet(c, 120)


def get_config(stage: str = "pretrain"):
  if stage not in STAGES:
    raise ValueError(f"addition.py:{stage}: choose a stage of {STAGES}")
  return globals()[stage]()
