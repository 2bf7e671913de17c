"""CIFAR-10, one class normal per run, 10 runs (paper Table: CIFAR-10).

    python -m fcd_jax.main --config configs/cifar10.py \
        --config.teacher.checkpoint=ViT-B_16.npz --workdir runs/cifar10

Paper settings: ViT-B/16 at 224, SGD lr 0.1, batch 32, warmup. Epochs (the paper gives none):
20 passes over the 5,000 normal images (~3,100 steps) after a 100-step warmup; the distillation
loss has flattened well before that on the prototype, and 20 keeps a 10-run table within a day
on one GPU.
"""

from configs import default


def get_config(arg: str | None = None):
    config = default.dataset_config("cifar10", batch_size=32, lr=0.1, epochs=20)
    return default.apply_arg(config, arg)
