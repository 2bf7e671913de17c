"""The paper's ablations (METHOD.md "The paper's ablations"): one config per figure, each naming
its arms; ``python -m fcd_jax.ablation --config configs/ablations/X.py --workdir W`` runs them.

An ablation config is an ordinary config plus ``ablation``: ``arms`` (names, in table order),
``overrides`` (per arm, a nested dict applied to the config) and ``statement`` (what the paper
says, printed beside the table). ``:runlocal`` swaps the dataset for the embedded digits (two
runs, a random teacher, a 4-block runlocal ViT at 16 px), so every arm runs end to end in
seconds.
"""

from collections.abc import Mapping

import ml_collections

from configs import default, mvtec

RUNLOCAL_SPLITS = "0,1"  # digits run names


def ablation_config(arg: str | None, arms: Mapping[str, Mapping], statement: str
                    ) -> ml_collections.ConfigDict:
    """MVTec AD with the paper's settings (``configs/mvtec.py``), or the digits at runlocal size
    with ``:runlocal``, plus the ``ablation`` field of ``arms`` (arm name -> overrides)."""
    if "runlocal" in default.parse_arg(arg):
        config = default.base_config()
        config.data.name = "digits"
        config.teacher.init = "random"
        config.splits = RUNLOCAL_SPLITS
        config.method.layers = (0, 1, 2, 3)  # a 4-block ViT, as the demo's
        config.method.anchor_layers = (3,)
        config = default.apply_arg(config, arg)
        config.data.image_size = 16  # 2 x 2 patches: the digits are 8 x 8
        config.data.eval_batch_size = 256
        config.eval.max_heatmaps = 0
    else:
        config = mvtec.get_config(arg)
    config.ablation = ml_collections.ConfigDict(
        dict(arms=tuple(arms), overrides=dict(arms), statement=statement))
    return config
