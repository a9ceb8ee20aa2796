"""Backbone features computed once: the on-disk cache of (five-)crops (``cache``) and the
nearest neighbours of its items (``knn``)."""
from stegoseg.features.cache import CacheSpec, CropView, FeatureCache, config_neighbors, extract_features
from stegoseg.features.knn import nearest_neighbors

__all__ = ["CacheSpec", "CropView", "FeatureCache", "config_neighbors", "extract_features", "nearest_neighbors"]
