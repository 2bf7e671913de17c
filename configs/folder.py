"""Your own images: a folder laid out like MVTec AD (train/good, test/<good or defect>, optional
ground_truth/<defect>/<name>_mask.png).

    python -m fcd_jax.main --config configs/folder.py --config.data.root=/data/my_parts \
        --config.data.category=widget --config.teacher.checkpoint=ViT-B_16.npz --workdir runs/widget
    python -m fcd_jax.main --config configs/folder.py --config.data.root=/data/my_parts \
        --config.data.category=widget --workdir runs/widget \
        --mode=predict --config.predict.inputs='/data/new_images/*.png'

``data.root`` may also be the category folder itself (holding train/ and test/). MVTec settings
(lr 0.2, batch 4, 100 epochs) since such sets are small.
"""

from configs import default


def get_config(arg: str | None = None):
    config = default.dataset_config("folder", batch_size=4, lr=0.2, epochs=100)
    config.data.eval_batch_size = 16
    return default.apply_arg(config, arg)
