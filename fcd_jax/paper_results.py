"""The paper's image AUROC tables (METHOD.md "The paper's results"; paper Tables 1-4), as data.

Numbers are percentages exactly as printed. Run names are the names this project gives its runs:
tfds's class names for CIFAR-10 and Fashion-MNIST, tfds's ``coarse_label`` names of CIFAR-100
(whose index is the superclass number 0..19 of the paper's Table 2), and MVTec AD's directory names.
"""

from __future__ import annotations

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

# tfds cifar100 ``coarse_label`` names, in label order (= the paper's superclass index 0..19).
CIFAR100_SUPERCLASSES: tuple[str, ...] = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
)  # fmt: skip

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

# MVTec AD directory names, in the column order of the paper's Table 4.
MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle", "hazelnut", "capsule", "metal_nut", "leather", "pill", "wood", "carpet",
    "tile", "grid", "cable", "transistor", "toothbrush", "screw", "zipper",
)  # fmt: skip


def _by_name(names: tuple[str, ...], values: tuple[float, ...]) -> dict[str, float]:
    return dict(zip(names, values, strict=True))


# Image AUROC (%) per run, keyed by ``config.data.name`` and then by run name.
PAPER_IMAGE_AUROC: dict[str, dict[str, float]] = {
    "cifar10": _by_name(
        CIFAR10_CLASSES, (97.3, 98.4, 94.5, 92.8, 97.5, 94.7, 95.7, 98.8, 96.6, 97.0)
    ),
    "cifar100": _by_name(
        CIFAR100_SUPERCLASSES,
        (92.8, 90.4, 83.2, 87.0, 92.2, 86.5, 88.9, 90.3, 88.2, 89.1,
         94.4, 88.7, 88.2, 87.1, 90.9, 87.9, 88.0, 92.4, 89.2, 82.6),
    ),
    # Sneaker is printed with two decimals (98.72) in Table 3; METHOD.md rounds it to 98.7.
    "fashion_mnist": _by_name(
        FASHION_MNIST_CLASSES, (93.0, 99.6, 92.2, 94.9, 92.0, 97.4, 84.5, 98.72, 97.2, 98.2)
    ),
    "mvtec": _by_name(
        MVTEC_CATEGORIES,
        (100.0, 96.4, 77.7, 95.1, 97.9, 88.1, 96.0, 81.3, 99.1, 71.7, 92.5, 88.4, 95.8, 95.0, 81.0),
    ),
}  # fmt: skip

# The means printed in the tables (%).
PAPER_MEAN_IMAGE_AUROC: dict[str, float] = {
    "cifar10": 96.3,
    "cifar100": 88.9,
    "fashion_mnist": 94.8,
    "mvtec": 90.4,
}


def paper_image_auroc(dataset: str, run_name: str) -> float | None:
    """The paper's image AUROC (%) of one run, or None where the paper has no number for it."""
    return PAPER_IMAGE_AUROC.get(dataset, {}).get(run_name)


def paper_mean_image_auroc(dataset: str, run_names: list[str] | tuple[str, ...]) -> float | None:
    """The paper's mean image AUROC (%) over ``run_names``, or None if it has none of them.

    The printed mean when ``run_names`` are exactly the paper's runs; otherwise the mean of the
    paper's numbers for the runs it has.
    """
    table = PAPER_IMAGE_AUROC.get(dataset, {})
    if table and set(run_names) == set(table):
        return PAPER_MEAN_IMAGE_AUROC[dataset]
    values = [table[name] for name in run_names if name in table]
    return sum(values) / len(values) if values else None
