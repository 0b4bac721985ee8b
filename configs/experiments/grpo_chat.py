"""GRPO of an SFT policy against a programmatic reward or a reward model (DeepSeekMath's
recipe, TRL's defaults): --config.train.init_from=SFT_WORKDIR
--config.rlhf.reward=module:function (or RM_WORKDIR) --config.rlhf.prompts=PROMPTS.jsonl.
docs/rlhf.md says what each logged figure means."""

import ml_collections

from configs import base


def get_config():
  c = base.get_config()
  c.stage = "rlhf.grpo"
  # Started from weights, the model keeps their architecture; RL turns dropout off itself.
  c.model = base.runtime_model()
  c.rlhf = ml_collections.ConfigDict()
  c.rlhf.prompts = ""  # prompt JSONL: {"prompt": text or messages, ...other fields kept}
  c.rlhf.prompt_field = "prompt"  # the field holding the prompt
  c.rlhf.max_prompt_len = 64  # tokens of a rendered prompt (longer ones: prompt_overflow)
  c.rlhf.prompt_overflow = "truncate"  # truncate (keep the end) | drop; both counted
  c.rlhf.batch_size = 16  # prompts per iteration
  c.rlhf.group_size = 8  # responses sampled per prompt (G); batch_size * G episodes
  c.rlhf.response_len = 32  # most tokens sampled per response
  c.rlhf.temperature = 1.0  # divides the logits in sampling and in every logprob
  c.rlhf.top_k = 0  # keep it 0: the trainer scores the full tempered distribution
  c.rlhf.top_p = 1.0  # keep it 1, for the same reason
  c.rlhf.reward = ""  # module:function (prompt records, completions -> floats) or an RM workdir
  c.rlhf.missing_eos_penalty = 0.0  # subtracted from the score of a response with no EOS
  c.rlhf.advantage = "group"  # group (std) | batch (std) | none (Dr. GRPO) | rloo
  c.rlhf.std_eps = 1e-4  # added to the std that divides the advantages
  c.rlhf.beta = 0.04  # the KL coefficient; 0 loads no reference model
  c.rlhf.kl_penalty = "loss"  # loss (per token, kl_estimator) | reward (summed k1, in the reward)
  c.rlhf.kl_estimator = "k3"  # the loss term: k3 (DeepSeekMath) | k2
  c.rlhf.clip_low = 0.2  # the ratio's clip below 1
  c.rlhf.clip_high = 0.2  # the ratio's clip above 1 (DAPO's clip-higher: 0.28)
  c.rlhf.logratio_clamp = 20.0  # |log ratio| before exp, so a stale token cannot overflow
  c.rlhf.loss_agg = "token_mean"  # token_mean | seq_mean (GRPO paper) | fixed_sum (Dr. GRPO)
  c.rlhf.mask_truncated = False  # drop responses cut at response_len (no EOS) from the loss
  c.rlhf.mask_flat_groups = False  # drop groups whose rewards are all equal from the loss
  c.rlhf.iterations = 1  # passes over each rollout batch (mu); > 1 keeps the old logprobs
  c.rlhf.minibatches = 1  # updates per pass
  c.rlhf.exact_kl_vocab = 4096  # log the exact KL (a sum over the vocabulary) up to this size
  c.rlhf.tokenizer = "char"  # only from scratch (no init_from): char | bpe | unigram
  c.rlhf.vocab_size = 2048  # only from scratch, for bpe and unigram
  c.rlhf.seed = 0  # prompt order, sampling and minibatch permutations
  c.opt.lr = 1e-6
  c.opt.final_lr = 1e-6
  c.opt.warmup_steps = 0
  c.opt.schedule = "constant"
  c.opt.weight_decay = 0.0
  c.opt.b2 = 0.99
  c.opt.eps = 1e-8
  c.train.init_from = "runs/sft"  # the SFT policy's workdir
  c.train.steps = 200  # GRPO iterations
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.checkpoint_every = 20
  return c
