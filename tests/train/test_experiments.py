"""Every experiment config builds valid settings, and the named recipes hold what they claim."""

import importlib
import pkgutil

import pytest

import configs.experiments
from data.corpus import DataConfig
from model.config import ModelConfig
from rlhf.dpo import DPOConfig
from rlhf.grpo import GRPOConfig
from rlhf.ppo import PPOConfig
from rlhf.reward import RMDataConfig
from tests.model.conftest import param_count
from train.classify import ClassifyDataConfig
from train.optim import OptimConfig
from train.sft import SFTDataConfig
from train.stage import TrainConfig, section
from train.weights import RUNTIME_FIELDS

NAMES = sorted(m.name for m in pkgutil.iter_modules(configs.experiments.__path__))


@pytest.mark.parametrize("name", NAMES)
def test_experiment_config_is_valid(name):
  """Each section becomes its dataclass: the stage's data config, the loop's, the model's
  (whole, or only the runtime fields a run starting from weights may set)."""
  c = importlib.import_module(f"configs.experiments.{name}").get_config()
  if c.train.init_from:
    assert set(c.model) <= set(RUNTIME_FIELDS), "a run from weights sets only runtime fields"
  else:
    ModelConfig(**{**c.model, "vocab_size": c.model.vocab_size or c.data.vocab_size})
  opt = OptimConfig(**dict(c.opt, total_steps=c.train.steps))
  assert c.data.batch_size % opt.grad_accum == 0, "microbatches must split the batch evenly"
  section(TrainConfig, c.train, "train")
  online = {"rlhf.ppo": PPOConfig, "rlhf.grpo": GRPOConfig}
  if c.stage in online:  # PPO and GRPO read prompts from their rlhf section, not data
    given = {k: c.rlhf[k] or "given/by/the/test" for k in ("prompts", "reward")}
    section(online[c.stage], {**c.rlhf, **given}, "rlhf")
    return
  if c.stage == "rlhf.dpo":
    section(DPOConfig, c.rlhf, "rlhf")
  data_config = {
    "train.pretrain": DataConfig,
    "train.sft": SFTDataConfig,
    "train.classify": ClassifyDataConfig,
    "rlhf.reward": RMDataConfig,
    "rlhf.dpo": RMDataConfig,
  }[c.stage]
  section(data_config, {**c.data, "path": c.data.get("path") or "given/by/the/test"}, "data")


def test_gpt2_124m_is_gpt2_small_with_nanogpt_recipe():
  """124,439,808 parameters at GPT-2's vocabulary of 50257; padded to 50304 (47 more rows of
  768), 124,475,904. nanoGPT's train_gpt2: 12 rows per GPU x 8 GPUs x 5 microbatches."""
  from configs.experiments import gpt2_124m

  c = gpt2_124m.get_config()
  assert param_count(ModelConfig(**c.model)) == 124_439_808 + 47 * 768
  assert c.data.batch_size * c.data.seq_len == 491_520
  assert c.data.batch_size // c.opt.grad_accum == 12 * 8
  assert (c.opt.lr, c.opt.final_lr, c.opt.warmup_steps, c.train.steps) == (
    6e-4,
    6e-5,
    2000,
    600_000,
  )
  assert (c.opt.b1, c.opt.b2, c.opt.weight_decay, c.opt.clip_norm) == (0.9, 0.95, 0.1, 1.0)
  assert c.opt.decay_embeddings
