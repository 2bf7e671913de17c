"""Paper Figs. 3 and 5: VGG16, ResNet18 and ViT-B/16, each with and without L_anchor, on MVTec AD;
VGG16 with and without on CIFAR-10 (METHOD.md "The paper's ablations": the paper's "VGG" is MKDAD,
Salehi et al. CVPR 2021, and "VGG+L_anchor" MKDAD with FCD's anchor term).

    python -m fcd_jax.ablation --config configs/ablations/backbones.py \
        --config.data.root=/data/mvtec_ad --config.teacher.checkpoint=ViT-B_16.npz --workdir W
    python -m fcd_jax.ablation --config configs/ablations/backbones.py:runlocal --workdir W

The CNN arms need their converted torchvision teachers: ``python -m fcd_jax.convert vgg16.pth
teachers/vgg16`` and ``resnet18.pth teachers/resnet18`` (torchvision's ImageNet weights), found
at :data:`CNN_TEACHERS` (relative to the working directory; edit it to move them).

Arms: ``vgg16``, ``resnet18``: MKDAD's loss and score (``lambda_mse`` 0.5 on MVTec AD, 0.01 on
CIFAR-10, MKDAD's); ``+anchor``: with L_anchor and S_A (``method.anchor_weight`` 1). ``vit``:
FCD without L_anchor (L_distill + L_Gram), ``vit+anchor``: the full method. ``cifar10/`` arms
run CIFAR-10 (32 px, MKDAD's input size for it). Optimisation of the CNN arms: the paper's for
its VGG ablation, SGD lr 0.001, batch 128 (:data:`PAPER_CNN_OPTIM`); ``:cnn_optim=mkdad`` takes
MKDAD's own, Adam lr 0.001, batch 64 (:data:`MKDAD_CNN_OPTIM`). Epochs (the paper gives none):
200 on MVTec AD (60-390 images per category: 100-600 steps at batch 128), 20 on CIFAR-10. The ViT
arms keep the paper's ViT settings (``configs/mvtec.py``).

``:runlocal``: the embedded digits for every arm (CIFAR-10's too), random teachers, CNNs 16 times
narrower at 32 px, two steps: it proves the machinery, its numbers are not comparable.
"""

from configs import default
from configs.ablations import ablation_config

CNN_TEACHERS = {"vgg16": "teachers/vgg16", "resnet18": "teachers/resnet18"}
PAPER_CNN_OPTIM = dict(optim=dict(name="sgd", lr=1e-3, warmup_steps=10), data=dict(batch_size=128))
MKDAD_CNN_OPTIM = dict(optim=dict(name="adam", lr=1e-3, warmup_steps=10), data=dict(batch_size=64))
CNN_OPTIMS = {"paper": PAPER_CNN_OPTIM, "mkdad": MKDAD_CNN_OPTIM}
STATEMENT = (
    "Paper (Fig. 3): L_anchor helps VGG (MKDAD) on CIFAR-10 by about 1 point in every class. "
    "Figs. 3(c) and 5 compare VGG16, ResNet18 and the ViT with and without L_anchor on MVTec AD "
    "(their bar values are not printed in the text)."
)


def merged(*overrides: dict) -> dict:
    """Nested dicts merged left to right (a later value wins)."""
    result: dict = {}
    for override in overrides:
        for key, value in override.items():
            if isinstance(value, dict):
                result[key] = merged(result.get(key, {}), value)
            else:
                result[key] = value
    return result


def cnn_arm(backbone: str, anchor: bool, dataset: str, optim: dict, runlocal: bool) -> dict:
    """The overrides of one CNN arm."""
    arm = dict(model=dict(backbone=backbone),
               method=dict(gram_weight=0.0, anchor_weight=1.0 if anchor else 0.0,
                           lambda_mse=0.5 if dataset == "mvtec" else 0.01))
    if runlocal:
        return merged(arm, dict(model=dict(cnn_width_divisor=16), data=dict(image_size=32)))
    data = dict(name=dataset, image_size=224 if dataset == "mvtec" else 32)
    return merged(optim, arm, dict(data=data, train=dict(epochs=200 if dataset == "mvtec" else 20),
                                   teacher=dict(checkpoint=CNN_TEACHERS[backbone])))


def arms(optim: dict, runlocal: bool) -> dict[str, dict]:
    """Arm name -> overrides, in table order."""
    table = {}
    for backbone in ("vgg16", "resnet18"):
        for anchor in (False, True):
            table[backbone + ("+anchor" if anchor else "")] = cnn_arm(
                backbone, anchor, "mvtec", optim, runlocal)
    table["vit"] = dict(method=dict(anchor_weight=0.0, gram_weight=1.0))
    table["vit+anchor"] = dict(method=dict(anchor_weight=1.0, gram_weight=1.0))
    for anchor in (False, True):
        table["cifar10/vgg16" + ("+anchor" if anchor else "")] = cnn_arm(
            "vgg16", anchor, "cifar10", optim, runlocal)
    return table


def get_config(arg: str | None = None):
    """``arg``: ``configs/ablations`` options, plus ``cnn_optim=paper|mkdad``."""
    options = [item for item in (arg or "").split(",") if item.strip()]
    choice = [item.partition("=")[2].strip() for item in options
              if item.strip().startswith("cnn_optim")]
    if choice and choice[-1] not in CNN_OPTIMS:
        raise ValueError(f"unknown cnn_optim={choice[-1]}: use one of {', '.join(CNN_OPTIMS)}")
    optim = CNN_OPTIMS[choice[-1] if choice else "paper"]
    rest = ",".join(item for item in options if not item.strip().startswith("cnn_optim"))
    runlocal = "runlocal" in default.parse_arg(rest)
    return ablation_config(rest, arms(optim, runlocal), STATEMENT)
