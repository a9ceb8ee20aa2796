"""stegoseg: unsupervised semantic segmentation with frozen self-supervised backbones.

Quick use::

    import stegoseg
    model = stegoseg.load("runs/camvid/train/checkpoint.pt")   # or a save_pretrained folder
    labels = model.segment("street.jpg")                       # (H, W) cluster ids

The pipeline, one package per stage: ``data`` -> ``backbones`` -> ``features`` (cache, KNN)
-> ``nn`` (head, probes) with ``losses`` and ``training`` -> ``evaluation`` (metrics,
protocol, CRF); ``methods`` composes them (baseline, STEGO, DatUS^2, the main job);
``model.SegmentationModel`` is the one model object from training to inference.
"""
__version__ = "0.1.0"


def load(path, weights=None, device="auto"):
    """Load a stegoseg checkpoint file or ``save_pretrained`` folder (see :func:`stegoseg.model.load`)."""
    from stegoseg.model import load as load_model

    return load_model(path, weights=weights, device=device)


def __getattr__(name):
    # the model class without importing torch at package import
    if name == "SegmentationModel":
        from stegoseg.model import SegmentationModel

        return SegmentationModel
    raise AttributeError(f"module 'stegoseg' has no attribute {name!r}")


__all__ = ["load", "SegmentationModel", "__version__"]
