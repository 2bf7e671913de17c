"""CIFAR-100, the 20 coarse superclasses as 20 runs, all trained at once (paper Table: CIFAR-100).

    python -m fcd_jax.main --config configs/cifar100_super.py \
        --config.teacher.checkpoint=ViT-B_16.npz --workdir runs/cifar100

All 20 students are stacked and trained in ONE compiled program over a ("split", "data") mesh;
``--config.parallel_splits=N`` trains them in groups of N, "auto" (default) picks the largest
group that fits the device memory. Paper settings: lr 0.1, batch 32 per split, warmup; 20 epochs
over the 2,500 normal images of a superclass (our choice, as for CIFAR-10).
"""

from configs import default


def get_config(arg: str | None = None):
    config = default.dataset_config("cifar100", batch_size=32, lr=0.1, epochs=20)
    config.parallel_splits = "auto"  # all 20 at once where they fit
    return default.apply_arg(config, arg)
