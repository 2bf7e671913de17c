"""MVTec AD, 15 categories as 15 runs (paper Table: MVTec AD), with pixel AUROC and PRO.

    python -m fcd_jax.main --config configs/mvtec.py --config.data.root=/data/mvtec_ad \
        --config.teacher.checkpoint=ViT-B_16.npz --workdir runs/mvtec

Paper settings: ViT-B/16 at 224, SGD lr 0.2, batch 4, warmup. Epochs (the paper gives none): 100
passes over the 60-390 normal images of a category (~1,500-10,000 steps), the usual budget of
student-teacher detectors on MVTec. ``--config.data.category=bottle`` runs one category.
"""

from configs import default


def get_config(arg: str | None = None):
    config = default.dataset_config("mvtec", batch_size=4, lr=0.2, epochs=100)
    config.data.eval_batch_size = 16
    config.train.checkpoint_every = 1000
    return default.apply_arg(config, arg)
