"""Paper Fig. 4 (MVTec AD): ViT with L_distill only, + L_Gram, + L_Gram + L_anchor (the full
method), through ``method.anchor_weight`` / ``method.gram_weight`` (METHOD.md "The paper's
ablations"; without the anchor term the score has no S_A either).

    python -m fcd_jax.ablation --config configs/ablations/loss_terms.py \
        --config.data.root=/data/mvtec_ad --config.teacher.checkpoint=ViT-B_16.npz --workdir W
    python -m fcd_jax.ablation --config configs/ablations/loss_terms.py:runlocal --workdir W
"""

from configs.ablations import ablation_config

ARMS = {
    "distill_only": dict(method=dict(anchor_weight=0.0, gram_weight=0.0)),
    "distill+gram": dict(method=dict(anchor_weight=0.0, gram_weight=1.0)),
    "full": dict(method=dict(anchor_weight=1.0, gram_weight=1.0)),
}
STATEMENT = ("Paper (Fig. 4, MVTec AD mean image AUROC): each of L_Gram and L_anchor adds about "
             "1 point over distillation alone (distill_only < distill+gram < full).")


def get_config(arg: str | None = None):
    return ablation_config(arg, ARMS, STATEMENT)
