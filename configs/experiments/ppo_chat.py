"""PPO of an SFT policy against a reward model (the InstructGPT recipe, lm-human-preferences'
settings): --config.train.init_from=SFT_WORKDIR --config.rlhf.reward=RM_WORKDIR
--config.rlhf.prompts=PROMPTS.jsonl. docs/rlhf.md says what each logged figure means."""

import ml_collections

from configs import base


def get_config():
  c = base.get_config()
  c.stage = "rlhf.ppo"
  # Started from weights, the model keeps their architecture; RL turns dropout off itself.
  c.model = base.runtime_model()
  c.rlhf = ml_collections.ConfigDict()
  c.rlhf.prompts = ""  # prompt JSONL: {"prompt": text or messages, ...other fields kept}
  c.rlhf.prompt_field = "prompt"  # the field holding the prompt
  c.rlhf.max_prompt_len = 64  # tokens of a rendered prompt (longer ones: prompt_overflow)
  c.rlhf.prompt_overflow = "truncate"  # truncate (keep the end) | drop; both counted
  c.rlhf.batch_size = 64  # episodes (prompts) per iteration
  c.rlhf.response_len = 32  # most tokens sampled per response
  c.rlhf.temperature = 1.0  # divides the logits in sampling and in every logprob
  c.rlhf.top_k = 0  # keep it 0: the trainer scores the full tempered distribution
  c.rlhf.top_p = 1.0  # keep it 1, for the same reason (else KL estimates go negative)
  c.rlhf.reward = "runs/rm"  # a reward model's workdir, or a function as module:function
  c.rlhf.missing_eos_penalty = 1.0  # subtracted from the score of a response with no EOS
  c.rlhf.kl_estimator = "k1"  # k1 | k2 | k3: the per-token KL in the reward
  c.rlhf.kl_controller = "adaptive"  # fixed | adaptive (toward kl_target)
  c.rlhf.beta = 0.15  # the KL coefficient (its start, when adaptive)
  c.rlhf.kl_target = 6.0  # the adaptive controller's target for the summed KL per episode
  c.rlhf.kl_horizon = 10000  # episodes over which the controller closes the gap
  c.rlhf.whiten_rewards = False  # scale per-token rewards to unit variance (mean kept)
  c.rlhf.gamma = 1.0  # GAE discount
  c.rlhf.lam = 0.95  # GAE lambda
  c.rlhf.epochs = 4  # passes over each rollout batch
  c.rlhf.minibatches = 4  # minibatches per pass (a fresh permutation each pass)
  c.rlhf.clip = 0.2  # the policy ratio's clip range
  c.rlhf.dual_clip = 0.0  # > 1 caps the loss of negative advantages at -A * dual_clip
  c.rlhf.logratio_clamp = 20.0  # |log ratio| before exp, so a stale token cannot overflow
  c.rlhf.value_clip = 0.2  # the value's clip range around the scoring pass's values
  c.rlhf.vf_coef = 0.1  # the value loss's weight
  c.rlhf.critic = "separate"  # separate (own model and optimizer) | shared (a value head)
  c.rlhf.critic_from = ""  # the separate critic's weights; "": the reward model's
  c.rlhf.critic_lr = 0.0  # the separate critic's learning rate; 0: opt.lr (schedule scaled)
  c.rlhf.exact_kl_vocab = 4096  # log the exact KL (a sum over the vocabulary) up to this size
  c.rlhf.tokenizer = "char"  # only from scratch (no init_from): char | bpe | unigram
  c.rlhf.vocab_size = 2048  # only from scratch, for bpe and unigram
  c.rlhf.seed = 0  # prompt order, sampling and minibatch permutations
  c.opt.lr = 1e-5
  c.opt.final_lr = 1e-5
  c.opt.warmup_steps = 0
  c.opt.schedule = "constant"
  c.opt.weight_decay = 0.0
  c.opt.b2 = 0.999
  c.opt.eps = 1e-5
  c.train.init_from = "runs/sft"  # the SFT policy's workdir
  c.train.steps = 200  # PPO iterations
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.checkpoint_every = 20
  return c
