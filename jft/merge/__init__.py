"""Model merging and layer stacking, with mergekit's semantics.

Three levels:

* Pure functions per tensor (:mod:`jft.merge.tensors`, :mod:`jft.merge.masks`; ``jax.numpy``,
  numpy or jax arrays in): :func:`linear`, :func:`task_arithmetic` (the family behind
  ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``breadcrumbs``,
  ``breadcrumbs_ties``, ``della`` and ``della_linear``: sparsify each task vector, elect signs,
  weight, normalise), :func:`slerp`, :func:`nuslerp`, :func:`karcher`, :func:`sce` and
  :func:`model_stock`.
* The method table (:mod:`jft.merge.methods`): :data:`METHODS` names each ``merge_method`` with
  its parameters and defaults; :func:`merge_tensor` merges one tensor, :func:`merge_params`
  whole param pytrees, layer by layer.
* :func:`merge_folders` (:mod:`jft.merge.folders`): a mergekit-style YAML (``merge_method``,
  ``base_model``, ``models`` or ``slices``, ``parameters`` with per-layer gradients and name
  filters, ``dtype``, ``tokenizer_source``; :mod:`jft.merge.config` reads and checks it) over
  Hugging Face folders, streamed tensor by tensor into a new folder (``jft merge merge.yaml
  --out DIR``). Slices of layers from one or more models, with the ``passthrough`` method, stack
  layers (frankenmerges, depth up-scaling). :func:`merge_moe` (:mod:`jft.merge.moe`) builds a
  Mixtral from dense experts (mergekit-moe's YAML).

Formulas follow mergekit 0.1.x: task vectors ``d_i = theta_i - base``; sparsified (``magnitude``
keeps the ``max(1, int(density * n))`` largest |d|; ``random`` keeps each entry with probability
``density``; ``magnitude_outliers`` drops the ``int(gamma * n)`` largest and the smallest so that
``int(density * n)`` remain; ``magprune`` (DELLA) keeps each entry with probability ``density -
epsilon`` (smallest |d| of its row) rising linearly with the magnitude rank to ``density +
epsilon`` (largest)), optionally rescaled to the L1 norm they had (``rescale``); weighted ``w_i
d_i``; with ``consensus`` (TIES) an entry counts only where its sign agrees with the sign of the
sum over models (``sum``) or the majority (``count``); ``normalize`` divides by the sum of the
weights that count (of all weights without consensus); ``lambda`` scales the result.

``nuslerp`` interpolates two models (their task vectors when a base is given) on the sphere at
``t = w_1 / (w_0 + w_1)``, over the whole tensor or per row (``nuslerp_flatten: false``) or
column (``nuslerp_row_wise: true``). ``karcher`` is the Riemannian mean of all inputs'
directions (``max_iter``, ``tol``), scaled by their mean norm. ``sce`` keeps the
``select_topk`` fraction of entries of largest variance across models, elects signs and weights
each task vector by its mean square.

``tokenizer_source: union`` (a new vocabulary from all inputs) is not supported: jft merges
models of one vocabulary, with the tokenizer of the base or of a named model.
"""

from jft.merge.config import MergeError, evaluate_setting, load_merge_config
from jft.merge.folders import merge_folders
from jft.merge.masks import consensus_mask, magprune_probabilities, sparsify, top_mask
from jft.merge.methods import METHODS, Method, merge_params, merge_tensor
from jft.merge.moe import GATE_MODES, merge_moe
from jft.merge.tensors import karcher, linear, model_stock, nuslerp, sce, slerp, task_arithmetic

__all__ = [
    "GATE_MODES",
    "METHODS",
    "MergeError",
    "Method",
    "consensus_mask",
    "evaluate_setting",
    "karcher",
    "linear",
    "load_merge_config",
    "magprune_probabilities",
    "merge_folders",
    "merge_moe",
    "merge_params",
    "merge_tensor",
    "model_stock",
    "nuslerp",
    "sce",
    "slerp",
    "sparsify",
    "task_arithmetic",
    "top_mask",
]
