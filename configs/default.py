"""Defaults shared by every config: the method of METHOD.md with the paper's settings.

Dataset configs import this module and override fields. Every field can be overridden on the
command line, e.g. ``--config.optim.lr=0.05`` or ``--config.method.layers="(3,6,9,11)"``.
"""

import ml_collections
from ml_collections import config_dict

from fcd_jax.models.vit import parse_variant

# Teachers beyond the paper's (``teacher=NAME``): DINOv2 ViTs (Oquab et al. 2024), patch 14, layer
# scale; ``_reg``: with 4 register tokens (Darcet et al. 2024). Variant -> (layer scale, registers).
TEACHERS = {
    f"dinov2_{size.lower()}14{reg}": (f"{size}/14", registers)
    for size in ("S", "B", "L") for reg, registers in (("", 0), ("_reg", 4))
}
PAPER_GROUPC = (3, 6, 9, 11)  # of the paper's 12 blocks, 0-based


def groupc_for_depth(depth: int) -> tuple[int, ...]:
    """The paper's groupc at the same relative depths: block c of 12 -> (c + 1) * depth / 12 - 1,
    e.g. (7, 13, 19, 23) for ViT-L's 24 blocks; the last block stays the anchor layer."""
    return tuple((c + 1) * depth // 12 - 1 for c in PAPER_GROUPC)


def parse_arg(arg: str | None) -> dict[str, str]:
    """``"variant=Ti/16,runlocal"`` -> ``{"variant": "Ti/16", "runlocal": ""}``."""
    options = {}
    for item in (arg or "").split(","):
        if item.strip():
            key, _, value = item.partition("=")
            options[key.strip()] = value.strip()
    unknown = set(options) - {"variant", "runlocal", "teacher"}
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}: use variant=V, "
                         "teacher=T, runlocal")
    if "teacher" in options and options["teacher"] not in TEACHERS:
        raise ValueError(f"unknown teacher={options['teacher']}: use one of {', '.join(TEACHERS)}")
    return options


def apply_teacher(config: ml_collections.ConfigDict, name: str) -> None:
    """``teacher=dinov2_b14`` etc.: the checkpoint's architecture (patch 14, layer scale,
    registers, LayerNorm eps 1e-6), at 224 px (16x16 patches), groupc scaled to its depth and
    the last block as anchor. The input normalisation is the checkpoint's (``arch.json``)."""
    variant, registers = TEACHERS[name]
    config.model.update(variant=variant, patch_size=0, width=0, depth=0, num_heads=0, mlp_dim=0,
                        layer_scale=True, num_registers=registers, layernorm_eps=1e-6)
    config.data.image_size = 224
    depth = parse_variant(variant)["depth"]
    config.method.layers = groupc_for_depth(depth)
    config.method.anchor_layers = (depth - 1,)


def apply_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Config arguments shared by every config: ``variant=Ti/16`` picks the backbone;
    ``teacher=dinov2_b14`` (see :data:`TEACHERS`) sets up a DINOv2 teacher; ``runlocal`` shrinks
    model and run for a laptop or a test (same method, same layers)."""
    options = parse_arg(arg)
    if "teacher" in options:
        apply_teacher(config, options["teacher"])
    if "variant" in options:
        config.model.variant = options["variant"]
    if "runlocal" in options:
        # A tiny ViT as deep as the method's layers need (12 blocks for groupc {3, 6, 9, 11}).
        depth = max(*config.method.layers, *config.method.anchor_layers) + 1
        config.model.update(patch_size=8, width=32, depth=depth, num_heads=2, mlp_dim=64)
        config.data.image_size = 32
        config.data.batch_size = 4
        config.data.eval_batch_size = 16
        config.method.top_k = 4
        config.train.steps = 2
        config.train.log_every = 1
        config.optim.warmup_steps = 1
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The paper's method with ViT-B/16 on CIFAR-10 settings; see the dataset configs."""
    return apply_arg(base_config(), arg)


def dataset_config(
    dataset: str, *, batch_size: int, lr: float, epochs: int
) -> ml_collections.ConfigDict:
    """``base_config`` with a dataset and its optimisation settings (paper section 4.1)."""
    config = base_config()
    config.data.name = dataset
    config.data.batch_size = batch_size
    config.optim.lr = lr
    config.train.epochs = epochs
    return config


def base_config() -> ml_collections.ConfigDict:
    """Every field, with the paper's settings; dataset configs override some, then ``apply_arg``."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.splits = "all"  # "all" or a comma-separated list of run names (e.g. "airplane,cat")

    # Data (METHOD.md "Training and data protocol").
    config.data = ml_collections.ConfigDict()
    # cifar10 | cifar100 | fashion_mnist | mvtec | folder | digits | textures; a comma-separated
    # list runs each in turn, in <workdir>/<name>.
    config.data.name = "cifar10"
    config.data.data_dir = ""  # tfds data_dir; "" = tfds default (~/tensorflow_datasets)
    config.data.root = ""  # mvtec / folder / textures root directory
    config.data.category = ""  # mvtec / folder category ("" = every category under root)
    config.data.image_size = 224
    # The teacher's image normalisation (x / 255 - mean) / std, one number or one per channel.
    # Unset = the teacher checkpoint's own (arch.json; Google's ViTs take 0.5, 0.5, i.e. [-1, 1]);
    # a value set here overrides it, with a warning where they differ (fcd_jax/teacher.py).
    config.data.mean = config_dict.placeholder(object)
    config.data.std = config_dict.placeholder(object)
    config.data.batch_size = 32
    config.data.eval_batch_size = 64
    config.data.holdout_fraction = 0.1  # normal training images held out to set the threshold
    config.data.skip_bad_images = False  # True: skip unreadable images and report how many
    config.data.download = True  # tfds: prepare a missing dataset (needs the network)
    config.data.split_seed = 0  # digits: the seeded train/test split of the normal digit
    config.data.textures = ml_collections.ConfigDict(
        dict(crop=64, n_train=80, n_test_good=12, n_test_per_defect=6, seed=0)
    )

    # Teacher and student backbone (METHOD.md "Networks").
    config.model = ml_collections.ConfigDict()
    config.model.variant = "B/16"
    config.model.patch_size = 0  # > 0 overrides the variant's (also width, depth, heads, mlp_dim)
    config.model.width = 0
    config.model.depth = 0
    config.model.num_heads = 0
    config.model.mlp_dim = 0
    # Unset = the teacher checkpoint's (as data.mean/std); a random teacher: 1e-6 and exact GELU.
    config.model.layernorm_eps = config_dict.placeholder(float)  # Google, timm: 1e-6; HF: 1e-12
    config.model.gelu_approximate = config_dict.placeholder(bool)  # vit_jax's flax code: tanh
    config.model.dtype = "float32"  # compute dtype; params, anchor and loss stay float32
    config.model.scan_layers = True  # False: unroll the layer scan (same params, same numbers)
    # Rematerialisation: each block keeps only what remat_policy names for the backward and
    # recomputes the rest. "dots": the outputs of its projection and MLP matmuls (the norms,
    # GELU, softmax and attention's batched products are recomputed; ViT-B/16 batch 8 on the
    # CPU: step temporaries 1.45 GB instead of 2.85 GB, and a faster step: BENCHMARKS.md
    # "Memory"); "nothing": keep nothing (least memory, one more forward). remat=False keeps
    # every intermediate that autodiff saves.
    config.model.remat = True
    config.model.remat_policy = "dots"
    # "" (CPU: "heads_first", fcd-jax's attention; elsewhere JAX's choice), "heads_first",
    # or jax.nn.dot_product_attention's "xla" or "cudnn" (GPU, bfloat16).
    config.model.attention_implementation = ""
    config.model.layer_scale = False  # per-channel ls1/ls2 on each block's branches (DINOv2)
    config.model.num_registers = 0  # register tokens after cls (DINOv2 _reg: 4; DeiT distilled: 1)
    # The paper's CNN ablations (METHOD.md "The paper's ablations"; configs/ablations/backbones.py):
    # "vit" | "vgg16" (teacher VGG16, student MKDAD's cloner) | "resnet18" (both ResNet18). A CNN
    # takes MKDAD's loss and score (method.loss_taps, score_taps, lambda_mse) and refuses L_Gram:
    # set method.gram_weight=0 with it. The ViT fields above do not apply to a CNN.
    config.model.backbone = "vit"
    config.model.cloner = "equal"  # the VGG student's widths: "equal" (VGG16's) | "small" (MKDAD's)
    config.model.cnn_width_divisor = 1  # > 1: both CNNs that much narrower (random teachers only)

    config.teacher = ml_collections.ConfigDict()
    # .npz (Google), .safetensors / .pth (timm), a HuggingFace directory, or a converted directory.
    config.teacher.checkpoint = ""
    config.teacher.init = "pretrained"  # "pretrained" | "random" (demo and tests only)
    config.teacher.cache_dir = ""  # where converted teachers are cached; "" = <workdir>/teacher

    # The method (METHOD.md "Losses" and "Anomaly score").
    config.method = ml_collections.ConfigDict()
    config.method.layers = (3, 6, 9, 11)  # groupc, 0-based block indices
    config.method.anchor_layers = (11,)
    config.method.lam = 1.0
    # Per-term weights (paper Fig. 4): L = L_distill + lam * (anchor_weight * L_anchor +
    # gram_weight * L_Gram); anchor_weight 0 also drops S_A from the score.
    config.method.anchor_weight = 1.0
    config.method.gram_weight = 1.0
    config.method.distill_form = "default"  # "default" (eq. 8 mean) | "paper" (eq. 3)
    config.method.gram_form = "default"  # "default" (||.||_F / D) | "paper" (eq. 5)
    config.method.gram_pairs = ()  # () = consecutive pairs of `layers`
    config.method.anchor_update = "mean"  # "mean" (exact running mean, eq. 1) | "ema"
    config.method.anchor_momentum = 0.99  # for anchor_update="ema"
    # Paper Fig. 7: "copy_frozen" (strategy 2, T's copied and frozen) | "learned" (strategy 1).
    config.method.pos_embedding = "copy_frozen"
    config.method.top_k = 20
    config.method.image_score = "paper"  # "paper" (S_D + S_A, eq. 10) | "max" (max of the map)
    config.method.map_sigma = 4.0  # Gaussian smoothing of the upsampled anomaly map, in pixels
    # CNN backbones only: 0-based taps of the loss and the score, () = METHOD.md's (VGG16: loss
    # (3, 6, 9, 12), score (6, 9, 12); ResNet18: all four); MKDAD's MSE weight (0.5 on MVTec AD).
    config.method.loss_taps = ()
    config.method.score_taps = ()
    config.method.lambda_mse = 0.01

    # Optimiser: SGD with linear warmup (paper section 4.1); clipping keeps the printed lr stable.
    config.optim = ml_collections.ConfigDict()
    config.optim.name = "sgd"  # "sgd" | "adam"
    config.optim.lr = 0.1
    config.optim.momentum = 0.0
    config.optim.nesterov = False
    config.optim.weight_decay = 0.0
    config.optim.warmup_steps = 100
    config.optim.schedule = "constant"  # after warmup: "constant" | "cosine"
    config.optim.clip_norm = 1.0  # global-norm clipping; 0 disables

    config.train = ml_collections.ConfigDict()
    config.train.epochs = 10
    config.train.steps = 0  # > 0 overrides epochs
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    # The teacher's features of every training image computed once and kept on the devices, so
    # the step skips the teacher forward: "auto" (when the images are seen more than once and the
    # step and the features fit 90% of a device's memory: MVTec, small folders), "on" or "off".
    # Same numbers.
    config.train.teacher_cache = "auto"

    config.eval = ml_collections.ConfigDict()
    config.eval.threshold_quantile = 0.99  # of held-out normal scores
    config.eval.max_heatmaps = 16

    config.predict = ml_collections.ConfigDict()
    config.predict.inputs = ""  # path, directory or glob
    config.predict.output_dir = ""  # "" = <workdir>/predict

    # Scale (many splits in one program, data parallel over a mesh).
    config.mesh_shape = ()  # (split, data); () = automatic
    config.parallel_splits = "auto"  # "auto" | an int: splits trained together in one program
    # How the splits of one program run: "vmap" vectorised (their matmuls batched: accelerators);
    # "map" one after another in the program (jax.lax.map: each split bit-identical to it
    # trained alone, one split's activations in memory at a time; needs mesh split axis 1);
    # "auto": "map" on CPU when the mesh's split axis is 1, else "vmap" (BENCHMARKS.md).
    config.stack_mode = "auto"
    return config
