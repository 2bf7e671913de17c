"""Dataset readers; ``fcd_jax.input_pipeline.list_splits`` / ``load_split`` pick one by name.

- ``tfds_one_class``: cifar10, cifar100 (20 superclasses), fashion_mnist
- ``folders``: mvtec, folder (any MVTec-shaped image folder)
- ``embedded``: digits, textures (offline, generated)
"""
