"""Model FLOPs for MFU, against the matmuls the model actually runs."""

import jax
import jax.extend
import numpy as np
import pytest
from flax import nnx

from model.config import preset
from model.transformer import Transformer
from tests.model.conftest import param_count
from train import metrics


def _dot_flops(jaxpr) -> int:
  """2 x output elements x contracted size over every dot_general, nested ones too (a scan
  body counts once per iteration)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      k = int(np.prod([eqn.invars[0].aval.shape[d] for d in lhs_contract]))
      total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * k
    times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      total += times * _dot_flops(sub)
  return total


@pytest.mark.parametrize(
  "name,overrides",
  [
    ("tiny", {}),  # RoPE, SwiGLU, untied head
    ("tiny_gpt2", {}),  # learned positions, tied head: the table is the head's matmul
    ("tiny", {"tie_embeddings": True, "scan_layers": True}),
    ("tiny_gpt2", {"tie_embeddings": False}),
  ],
)
def test_flops_per_token_is_three_times_the_forward_matmuls(name, overrides):
  """Training costs forward + backward = 3x the forward's matmul FLOPs; the forward's are
  2 per matmul parameter plus 4 x d_model x seq_len per layer for QK^T and PV (the full
  square, which the einsum path computes). The only gap: norm scales and biases count as
  parameters in 6N without a matmul. The sequence (16) is shorter than max_seq_len (32), so
  the attention term must follow the length trained on."""
  cfg = preset(name, max_seq_len=32, **overrides)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  b, l = 2, 16
  toks = np.ones((b, l), np.int32)
  forward = _dot_flops(jax.make_jaxpr(lambda: model(toks))().jaxpr) / (b * l)
  got = metrics.flops_per_token(cfg, param_count(cfg), l)
  no_matmul = sum(
    int(np.prod(x.shape))
    for p, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model)))
    if "norm" in jax.tree_util.keystr(p) or "bias" in jax.tree_util.keystr(p)
  )
  np.testing.assert_allclose(got - 6 * no_matmul, 3 * forward, rtol=1e-9)
