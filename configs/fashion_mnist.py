"""Fashion-MNIST, one class normal per run, 10 runs (paper Table: Fashion-MNIST).

    python -m fcd_jax.main --config configs/fashion_mnist.py \
        --config.teacher.checkpoint=ViT-B_16.npz --workdir runs/fashion_mnist

Grayscale 28x28 images are replicated to 3 channels and resized to 224 on the device. Paper
settings: lr 0.1, batch 32, warmup; 20 epochs over the 6,000 normal images (our choice, as for
CIFAR-10).
"""

from configs import default


def get_config(arg: str | None = None):
    config = default.dataset_config("fashion_mnist", batch_size=32, lr=0.1, epochs=20)
    return default.apply_arg(config, arg)
