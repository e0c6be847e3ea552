"""The training objective of ``sae.training.losses.training_loss`` at close to the cost of one matrix product.

Same values and gradients (float tolerance; tests/test_fast.py, both formulations), same
signature (plus the optional ``dead_bound``, ``formulation`` and ``compiled``), same return
contract. The cost floor of a step is the encoder product ``pre = (x - b_pre) W_enc^T + b_enc``
(B x d x n multiply-adds). Autograd through the reference spends three such products plus
dense (B, n) temporaries for Top-k, the masks and AuxK's selection over all n columns. Here:

* Top-k by group maxima (``topk``): exact; one vectorised max over column groups reads the
  (B, n) matrix once, and the selections see a few hundred entries per row.
* Decoder, forward and backward, over the k selected atoms only (``sparse``): embedding-bags
  of k rows, and products sampled at the support; or, where tensor cores make them cheaper
  (CUDA under 16-bit autocast), products with the dense code (``plan.Formulation``).
* Encoder backward (``encoder_grad``): grad X is never formed. Without a penalty the gradient
  of ``pre`` has k (+ AuxK's) entries per row: grad W_enc is again a transposed embedding-bag.
  With one it is dense on the penalised columns: one product G^T X.
* Penalties (``penalties``): dispatched to the regularizer's fused kernels
  (``sae.regularizers``), on the batch-active columns only when they are few. A regularizer
  without fused kernels is differentiated by autograd on its reference penalty, through the
  ``pre`` this step returns; Top-k, decoder and AuxK stay fused.
* AuxK on the dead columns only (``auxk``): at most C columns (C >= the dead count, a host
  integer); C = 0 (no dead latent) costs nothing.
* No host-device synchronisation: every decision is taken from shapes, the config and host
  integers (``plan``). On CUDA the dead-count bound is the caller's (``dead_bound``); without
  it AuxK looks at all n columns (exact). On the CPU the counts are read directly.

Nothing here holds process-wide state: the formulation and ``compiled`` are arguments.
Fallback to the reference ``training_loss``: an input that itself requires a gradient. Tied
weights, LayerNorm, autocast (the dense products in the autocast dtype, the rest in float32)
and ``k = n`` run on the fast path. The returned ``ForwardOutput`` holds detached tensors
(x_hat, pre, code): the graph lives in the returned ``LossParts`` only. The backward runs
once (it reuses the forward's buffers). Measured costs: docs/performance.md.
"""

from sae.training.fast.loss import fast_training_loss
from sae.training.fast.penalties import active_capacity
from sae.training.fast.plan import (
    AUTO,
    DECODER_MODES,
    TOPK_MODES,
    Formulation,
    StepPlan,
    make_plan,
    resolved_formulation,
)
from sae.training.fast.topk import topk_by_chunks

__all__ = ["AUTO", "DECODER_MODES", "TOPK_MODES", "Formulation", "StepPlan", "active_capacity",
           "fast_training_loss", "make_plan", "resolved_formulation", "topk_by_chunks"]
