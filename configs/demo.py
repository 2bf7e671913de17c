"""The embedded offline demo: runs anywhere, downloads nothing, finishes on 2 CPU cores.

    python -m fcd_jax.main --config configs/demo.py --workdir runs/demo

Two datasets, one after the other (``runs/demo/digits``, ``runs/demo/textures``):
- ``digits``: scikit-learn's 8x8 digits, one digit normal per run (10 runs, trained together);
- ``textures``: MVTec-style crops of scikit-image's brick, grass and gravel photographs with
  synthetic scratches, holes, pasted patches and stains, and their pixel masks (3 runs).

No pretrained weights can be had offline, so the teacher is RANDOM and the backbone small: the
demo proves the machinery (training, checkpoints, scores, maps, thresholds, reports), and its
numbers are not comparable to the paper's. The method is the paper's (same losses and score,
groupc scaled to 4 blocks: every block of the small ViT); Adam is used because the random
teacher's features are far from what SGD at the paper's rates was tuned for.
"""

from configs import default


def get_config(arg: str | None = None):
    config = default.base_config()
    config.data.name = "digits,textures"
    config.data.image_size = 64
    config.data.batch_size = 32
    config.data.eval_batch_size = 128
    config.data.holdout_fraction = 0.15

    config.model.update(patch_size=8, width=64, depth=4, num_heads=4, mlp_dim=128)
    config.teacher.init = "random"

    config.method.layers = (0, 1, 2, 3)
    config.method.anchor_layers = (3,)
    config.method.top_k = 8

    config.optim.name = "adam"
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 50
    config.optim.schedule = "cosine"
    config.train.epochs = 30
    config.train.log_every = 20
    config.train.checkpoint_every = 200
    config.eval.max_heatmaps = 8

    # The 8x8 digits need no 64 px: 32 px in 8 px patches (16 tokens) is 4x cheaper. The textures'
    # defects are small: they get more steps, and the image score is the anomaly map's maximum
    # (METHOD.md "Beyond the paper": the top-k mean of the paper's score dilutes small defects).
    config.per_dataset = dict(
        digits=dict(data=dict(image_size=32), method=dict(top_k=4)),
        textures=dict(train=dict(epochs=60), method=dict(image_score="max")),
    )
    return default.apply_arg(config, arg)
