"""Studies: measurements that explain why the method works (or does not) on a dataset.

Each module is one study with a library entry point ``run_<name>_study(cfg, out, ...)``
and an ``add_cli(subparsers)`` that registers its ``stegoseg study-<name>`` command.
Modules are imported on demand, so importing this package is cheap.
"""
