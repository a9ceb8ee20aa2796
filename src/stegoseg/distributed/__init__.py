"""The data-parallel stages on a Ray cluster (``--ray-address``): :mod:`.engine` connects and
runs work items through actor pools, :mod:`.stages` holds the actors of each stage."""
