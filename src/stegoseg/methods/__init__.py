"""Methods, each a small module composed of the stages: the raw-feature baseline
(``baseline``), STEGO (``stego``), DatUS^2 (``datus``), the main job (``run``), and the
building blocks they share (``common``: datasets and backbones from a config, checks before
work, feature cache, probes, evaluation)."""
