"""Experiment configurations (ml_collections), one module per experiment.

Every experiment module defines `get_config()`; the `default_*_configs` modules define
`get_default_configs()`, which the experiment modules start from. Pass a module's path to an entry
script, e.g. `python main.py --config configs/ve/cifar10_ncsnpp_continuous.py`, and override single
fields with `--config.<section>.<field> value`.
"""
