"""stegoseg: unsupervised semantic segmentation with frozen self-supervised backbones.

Quick use::

    import stegoseg
    model = stegoseg.load("runs/camvid/checkpoint.pt")
    labels = model.segment("street.jpg")        # (H, W) cluster ids
"""
__version__ = "0.1.0"


def load(path, weights=None, device="cpu"):
    """Load a stegoseg checkpoint (see :func:`stegoseg.model.load`)."""
    from stegoseg.model import load as _load

    return _load(path, weights=weights, device=device)


__all__ = ["load", "__version__"]
