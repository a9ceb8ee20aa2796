"""The trained parts, as plain PyTorch modules: heads (STEGO's, fixed projections; a registry
by kind), the cluster and linear probes, seeded spherical k-means."""
from stegoseg.nn.heads import HEADS, ProjectionHead, SegmentationHead, build_head
from stegoseg.nn.kmeans import spherical_kmeans
from stegoseg.nn.probes import (
           ClusterProbe,
           LinearProbe,
           set_centroids,
           train_linear_probe,
)

__all__ = ["HEADS", "ClusterProbe", "LinearProbe", "ProjectionHead", "SegmentationHead", "build_head",
           "set_centroids", "spherical_kmeans", "train_linear_probe"]
