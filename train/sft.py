"""Supervised fine-tuning as a stage: chat JSONL, loss on assistant tokens and their end marker."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from data import chat, sources
from data.arrays import split_held_out
from data.sources import DataError
from model.sampling import Sampler, SamplingConfig, left_pad
from train import metrics
from train import stage as stagelib
from train.pretrain import check_query_blocks, lm_model_config, setup_lm

BUILTIN = "shakespeare"  # data.path naming the built-in dialogue chats of the plays


@dataclasses.dataclass(frozen=True)
class SFTDataConfig:
  """What SFT reads; configs/experiments/sft_*.py documents each field."""

  path: str = ""
  val_path: str = ""
  val_fraction: float = 0.05
  tokenizer: str = "char"
  vocab_size: int = 2048
  seq_len: int = 256
  batch_size: int = 16
  eval_batch_size: int = 16
  pack: bool = True
  overflow: str = "truncate"
  seed: int = 0
  worker_count: int = 0
  eval_replies: int = 4
  reply_tokens: int = 64

  def __post_init__(self):
    if not self.path:
      raise DataError("data.path is empty: give the SFT chat JSONL (files, a directory or a glob)")
    if self.tokenizer not in stagelib.TOKENIZERS:
      raise DataError(
        f"data.tokenizer={self.tokenizer!r} is unknown; choose one of {', '.join(stagelib.TOKENIZERS)}"
      )
    if self.overflow not in chat.OVERFLOW:
      raise DataError(f"data.overflow={self.overflow!r}; choose one of {chat.OVERFLOW}")
    for name in ("seq_len", "batch_size", "eval_batch_size", "vocab_size", "reply_tokens"):
      if getattr(self, name) <= 0:
        raise DataError(f"data.{name} must be > 0, got {getattr(self, name)}")


def _chats(dc: SFTDataConfig) -> tuple[list, list]:
  """(training chats, held-out chats) from data.path and data.val_path or data.val_fraction;
  the built-in dialogue is held out by play, as pretraining splits the plays."""
  if dc.path == BUILTIN:
    return list(sources.shakespeare_dialogue("train")), list(sources.shakespeare_dialogue("val"))
  examples = list(sources.read_chat(dc.path))
  if dc.val_path:
    return examples, list(sources.read_chat(dc.val_path))
  return split_held_out(examples, dc.val_fraction, dc.seed)


def _texts(examples) -> list[str]:
  return [m["content"] for messages in examples for m in messages]


def _reply_prompts(examples, n: int):
  """(conversation before the last assistant turn, that turn's text) of up to n examples."""
  out = []
  for messages in examples if n > 0 else []:
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is not None:
      out.append((messages[:last], messages[last]["content"]))
    if len(out) == n:
      break
  return out


class SFT(stagelib.BatchStage):
  """One language model ('model') fine-tuned on chats; evaluation is the held-out loss and
  greedy replies to held-out prompts (with their exact-match rate)."""

  name = "sft"
  state_name = "model"
  echo_samples = True

  def __init__(self, config, workdir: str):
    self.train_cfg = tc = stagelib.section(stagelib.TrainConfig, config.train, "train")
    self.data_cfg = dc = stagelib.section(SFTDataConfig, config.data, "data")
    check_query_blocks(config, dc.seq_len)
    source = stagelib.init_source(tc)
    train, held_out = _chats(dc)
    self.tokenizer = stagelib.stage_tokenizer(
      dc.tokenizer, dc.vocab_size, source, _texts(train + held_out), workdir
    )
    self.model_cfg = lm_model_config(config, self.tokenizer, source, dc.seq_len)
    self.opt_cfg = stagelib.opt_config(config, tc.steps)

    self.mesh = stagelib.make_mesh(config)
    self.mesh.check_batch("data.batch_size", dc.batch_size, self.opt_cfg.grad_accum)
    self.mesh.check_batch("data.eval_batch_size", dc.eval_batch_size)
    self.train_arrays, self.train_stats = chat.pack_sft(
      train, self.tokenizer, seq_len=dc.seq_len, overflow=dc.overflow, pack=dc.pack
    )
    self.val_arrays, self.val_stats = (
      chat.pack_sft(held_out, self.tokenizer, seq_len=dc.seq_len, overflow=dc.overflow)
      if held_out
      else (None, {})
    )
    self.replies = _reply_prompts(held_out, dc.eval_replies)
    setup_lm(self, source, dc.seq_len, dc.batch_size)
    self._it = self.batch_iterator("sft")
    self.sampler = Sampler(self.graphdef, self.mesh.mesh, self.mesh.rules)

  @property
  def params(self):
    return self.states["model"].params

  def models(self):
    return {"model": ("lm", self.model_cfg)}

  def checkpoint_items(self):
    return {"chat_template": chat.template_item(self.tokenizer)}

  def reply(self, conversations, params=None, max_new_tokens: int | None = None) -> list[str]:
    """Greedy assistant replies to conversations (message lists), decoded up to <|end|>."""
    tok = self.tokenizer
    prompts = [chat.render_prompt(tok, messages) for messages in conversations]
    n = max_new_tokens or self.data_cfg.reply_tokens
    if self.model_cfg.position == "learned":
      n = min(n, self.model_cfg.max_seq_len - max(len(p) for p in prompts))
    cfg = SamplingConfig(max_new_tokens=n, temperature=0.0, eos_id=tok.end_id, pad_id=tok.pad_id)
    tokens, mask = left_pad(prompts, tok.pad_id)
    params = self.params if params is None else params
    out = self.sampler(params, tokens, mask, jax.random.PRNGKey(0), cfg)
    replies = []
    for ids, live in zip(np.asarray(out.tokens_BxN), np.asarray(out.mask_BxN)):
      ids = [int(t) for t in ids[live > 0]]
      replies.append(tok.decode(ids[: ids.index(tok.end_id)] if tok.end_id in ids else ids))
    return replies

  def evaluate(self, params=None) -> dict:
    """The held-out loss (on assistant tokens) and greedy replies' exact-match rate."""
    totals = self.held_out_totals(params)
    if totals is None:
      return {}
    params = self.params if params is None else params
    result = metrics.lm_eval_result(totals)
    if self.replies:
      got = self.reply([c for c, _ in self.replies], params)
      result["reply_exact_match"] = float(np.mean([g == w for g, (_, w) in zip(got, self.replies)]))
    return result

  def samples(self, seed: int) -> dict[str, str]:
    del seed  # replies are greedy
    if not self.replies:
      return {}
    got = self.reply([c for c, _ in self.replies])
    lines = []
    for (conversation, want), reply in zip(self.replies, got):
      lines.append(f"{conversation[-1]['role']}: {conversation[-1]['content']!r}")
      lines.append(f"  reply: {reply!r}  (reference {want!r})")
    return {"replies": "\n".join(lines)}


def build(config, workdir: str) -> SFT:
  return SFT(config, workdir)
