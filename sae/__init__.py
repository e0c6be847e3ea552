"""Top-k sparse autoencoders on frozen vision embeddings, with the sparsity regularizers of
arXiv:2606.27321, and the grid runner around them.

The public surface, importable from ``sae`` (lazily, so ``import sae.config`` stays torch-free):

    TopKSAE, SparseCode           the model                        (sae.model)
    off_support_l1, l1_l2_ratio   the two regularizers             (sae.regularizers)
    load                          a trained SAE for a notebook: raw embeddings in (sae.pretrained)
    load_model, save_model        a saved SAE as trained           (sae.model)
    run_id                        the identity of a run            (sae.identity)
    RootConfig, validate          the typed config                 (sae.config)
    metrics                       the metric library               (sae.metrics)
"""

from importlib import import_module

_EXPORTS = {
    "TopKSAE": "sae.model", "SparseCode": "sae.model",
    "off_support_l1": "sae.regularizers", "l1_l2_ratio": "sae.regularizers",
    "batch_active": "sae.regularizers",
    "load": "sae.pretrained", "load_model": "sae.model", "save_model": "sae.model", "run_id": "sae.identity",
    "RootConfig": "sae.config", "validate": "sae.config",
}
__all__ = [*_EXPORTS, "metrics"]


def __getattr__(name: str):
    if name == "metrics":
        return import_module("sae.metrics")
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sae' has no attribute {name!r}")
