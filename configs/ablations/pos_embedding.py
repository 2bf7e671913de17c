"""Paper Fig. 7 (MVTec AD): the student's position embedding, strategy 1 (``learned``) vs
strategy 2 (``copy_frozen``, T's copied and frozen; the default).

    python -m fcd_jax.ablation --config configs/ablations/pos_embedding.py \
        --config.data.root=/data/mvtec_ad --config.teacher.checkpoint=ViT-B_16.npz --workdir W
    python -m fcd_jax.ablation --config configs/ablations/pos_embedding.py:runlocal --workdir W
"""

from configs.ablations import ablation_config

ARMS = {
    "learned": dict(method=dict(pos_embedding="learned")),
    "copy_frozen": dict(method=dict(pos_embedding="copy_frozen")),
}
STATEMENT = "Paper (Fig. 7, MVTec AD): strategy 2 (copy_frozen) beats strategy 1 (learned)."


def get_config(arg: str | None = None):
    return ablation_config(arg, ARMS, STATEMENT)
