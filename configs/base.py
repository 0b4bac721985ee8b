"""Defaults for every run. Experiments start from get_config() and change what differs."""

from __future__ import annotations

import dataclasses

import ml_collections

from model.config import preset
from train.optim import OptimConfig


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """A model preset as a ConfigDict (every ModelConfig field), with fields replaced.

  vocab_size 0 means: take it from the run's tokenizer."""
  fields = dataclasses.asdict(preset(name))
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def runtime_model(**fields) -> ml_collections.ConfigDict:
  """config.model of a run that starts from weights (train.init_from): the architecture comes
  from them, so only runtime fields are set: `fields`, and LoRA off (--config.model.lora_rank=8
  turns it on; model/config.py documents each field)."""
  lora = {k: v for k, v in dataclasses.asdict(preset("tiny")).items() if k.startswith("lora_")}
  return ml_collections.ConfigDict({**lora, **fields})


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # The stage to train: a module with build(config, workdir), e.g. train.pretrain, train.sft.
  c.stage = "train.pretrain"
  c.model = model_config("tiny", vocab_size=0)  # model/config.py documents each field

  c.data = ml_collections.ConfigDict()
  c.data.corpus = "shakespeare"  # shakespeare (built-in plays) | text (a file, 90/10) | shards
  c.data.path = ""  # text file for 'text' (default: tinyshakespeare), prepared dir for 'shards'
  c.data.tokenizer = "bpe"  # bpe | unigram (sentencepiece, trained on train split) | char
  c.data.vocab_size = 2048  # sentencepiece vocabulary size
  c.data.seq_len = 128  # tokens per training row
  c.data.batch_size = 16  # rows per optimizer step, across all devices and hosts
  c.data.eval_batch_size = 32  # rows per evaluation batch
  c.data.add_bos = True  # prepend BOS to every document
  c.data.add_eos = True  # append EOS to every document
  c.data.seed = 0  # shuffling seed
  c.data.worker_count = 0  # grain worker processes (0: load in the training process)
  c.data.window_stride = 0  # tokens between training rows; 0: seq_len+1 (no overlap), 1: all

  c.opt = ml_collections.ConfigDict(dataclasses.asdict(OptimConfig()))  # train/optim.py
  c.opt.total_steps = 0  # schedule length; 0 means train.steps

  c.mesh = ml_collections.ConfigDict()
  c.mesh.layout = "dp"  # a file in configs/sharding: dp | fsdp | tp | fsdp_tp | dp_fsdp_tp
  c.mesh.data = 0  # size of the data axis; 0 keeps the layout's, -1 fills the devices
  c.mesh.fsdp = 0  # size of the fsdp axis; as above
  c.mesh.tensor = 0  # size of the tensor axis; as above
  c.mesh.devices = 0  # devices the mesh spans, the first N (0: all of them)
  # Gradient reduction across devices. xla: jit's partitioner reduces each parameter's gradient
  # after its matmul. flat: pure data parallelism only (replicated parameters); each device
  # computes its shard's gradients and one all-reduce sums them all as one flat vector, which
  # XLA:CPU runs faster than its per-parameter all-reduce (docs/benchmarks.md). It costs one
  # more gradient-sized float32 buffer (not in train.plan); with threefry or rbg dropout masks
  # each device draws the whole batch's masks (hash masks: only its rows).
  c.mesh.grad_reduce = "xla"

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # optimizer steps
  c.train.seed = 0  # parameter init and dropout seed
  c.train.log_every = 10  # steps between logged training metrics
  c.train.eval_every = 250  # steps between evaluations (0: only at the end)
  c.train.eval_batches = 0  # validation batches per evaluation (0: the whole split)
  c.train.checkpoint_every = 250  # steps between checkpoints (0: only at the end)
  c.train.keep_checkpoints = 3  # checkpoints kept on disk
  c.train.async_checkpoints = True  # write checkpoints in the background
  c.train.max_seconds = 0.0  # stop (and checkpoint) after this much training time; 0: no limit
  c.train.z_loss = 0.0  # weight of the log(Z)^2 auxiliary loss
  # MFU's peak: one device's FLOP/s (the loop multiplies it by the device count); 0: measure a
  # float32 matmul on this host's CPU.
  c.train.peak_flops = 0.0
  c.train.sample_prompt = ""  # text that evaluation samples continue
  c.train.sample_tokens = 200  # tokens per evaluation sample
  c.train.sample_temperature = 0.8  # evaluation sampling temperature
  c.train.sample_top_k = 0  # evaluation sampling top-k (0: off)
  c.train.tensorboard = True  # write TensorBoard scalars under workdir/tensorboard
  c.train.progress = True  # show a progress bar
  # Start from weights: one of our workdirs (its latest checkpoint) or a Hugging Face folder
  # (config.json + safetensors). The model's architecture then comes from the weights, and
  # config.model may set only how it runs (dropout, dtype, remat, ...). "": random init.
  c.train.init_from = ""
  c.train.init_step = 0  # the workdir's checkpoint step to start from; 0: its latest
  c.train.init_state = ""  # which of the checkpoint's models ("" : its language model)
  # A step whose loss or gradient is NaN or Inf never changes the model. stop: the run stops,
  # naming the step (its last checkpoint is good); skip: the run goes on to the next batch.
  c.train.nonfinite = "stop"
  # Resume a workdir whose checkpoints another config made (the fields that differ are named
  # and the run refuses, unless this is set). train/checkpoint.py:FREE_TO_CHANGE lists the
  # fields any resume may change: steps, logging, checkpointing, the mesh.
  c.train.allow_config_change = False

  c.distributed = ml_collections.ConfigDict()  # docs/multihost.md; read by train/distributed.py
  c.distributed.coordinator = ""  # process 0's host:port; "": the launcher's env if any; "off": one
  c.distributed.num_processes = 0  # processes in the job; 0: from the launcher's environment
  c.distributed.process_id = -1  # this process's index; -1: from the launcher's environment
  c.distributed.local_device_count = 0  # CPU only: simulated devices per process; 0: XLA's default
  c.distributed.xla_flags = ""  # appended to XLA_FLAGS before JAX starts, e.g. backend tuning
  c.distributed.timeout_seconds = 300  # how long to wait for every process to join
  return c
