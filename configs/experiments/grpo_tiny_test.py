"""A seconds-long GRPO run for tests, from scratch: a tiny model, a character tokenizer on the
prompts of --config.rlhf.prompts and a programmatic reward (--config.rlhf.reward)."""

from configs import base
from configs.experiments import grpo_chat


def get_config():
  c = grpo_chat.get_config()
  c.model = base.model_config("tiny", vocab_size=0, max_seq_len=64, init_std=0.3)
  c.rlhf.prompts = ""  # set by the test
  c.rlhf.reward = ""  # set by the test
  c.train.init_from = ""
  c.rlhf.batch_size = 4
  c.rlhf.group_size = 4
  c.rlhf.response_len = 4
  c.rlhf.max_prompt_len = 16
  c.rlhf.iterations = 2  # off-policy updates: the old logprobs travel through a resume
  c.rlhf.minibatches = 2
  c.opt.lr = 1e-3
  c.opt.eps = 1e-5
  c.train.steps = 20
  c.train.checkpoint_every = 5
  c.train.tensorboard = False
  c.train.progress = False
  return c
