"""Shared test setup. Environment first: it must be set before torch or jax is imported.

Then the helpers tests share, as fixtures (no test module imports another): the tiny configs,
the production train step of one split, a converted tiny teacher checkpoint, and JAX's
persistent compilation cache shared by a module and its CLI subprocesses.
"""

import contextlib
import os
import tempfile
import types
from pathlib import Path

# OpenMP spin-waiting makes eager PyTorch 5-8x slower on small machines.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Compiled programs are cached on disk and shared by the test processes (xdist workers, CLI
# subprocesses): many tests compile the same tiny train step, and compiling dominates their time.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fcd_jax_test_compile_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scale_checks  # noqa: E402  (tests/ is on sys.path: the scale-check script's constants)
from jax.experimental.compilation_cache import compilation_cache  # noqa: E402

from configs import default  # noqa: E402
from fcd_jax import convert, models, networks, parallel, teacher, train_state, train_step  # noqa: E402

IMAGENET_NORMALISATION = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def make_tiny_config(reconciled: bool = True, **method):
    """A 4-block ViT of width 32 on 16 px digits (batch 16, Adam): trains in seconds on a CPU.
    ``reconciled``: with a random teacher's spec filled in (``teacher.reconcile``)."""
    config = default.base_config()
    config.data.name = "digits"
    config.data.image_size = 16
    config.data.batch_size = 16
    config.model.update(patch_size=4, width=32, depth=4, num_heads=2, mlp_dim=64)
    config.method.update({"layers": (0, 1, 2, 3), "anchor_layers": (3,), "top_k": 4, **method})
    config.optim.update(name="adam", lr=1e-3, warmup_steps=10)
    config.teacher.init = "random"
    return teacher.reconcile(config, None) if reconciled else config


@pytest.fixture(scope="session")
def tiny_config():
    """``make_tiny_config`` as a fixture: ``tiny_config(**method_overrides)``."""
    return make_tiny_config


def make_single_split(config, total_steps=100, teacher_params=None, cached_teacher=False):
    """The production train step for one split on one device (a stack of one), a fresh state,
    and a random teacher of the student's depth unless ``teacher_params`` (full depth) are
    given. ``setup.step(states, teacher, images [1, B, ...])``."""
    nets = networks.build_networks(config)
    teacher_key, _ = networks.split_keys(config.seed)
    if teacher_params is None:
        teacher_params = models.init_params(nets.student, config.data.image_size, teacher_key)
    teacher_params = nets.teacher_params(teacher_params)
    mesh = parallel.make_mesh(1, config.data.batch_size, (1, 1), jax.devices()[:1])
    states = train_state.init_stacked_states(
        config, teacher_params["pos_embedding"], nets, np.array([0]), np.array([total_steps]),
        mesh,
    )
    return types.SimpleNamespace(
        config=config, networks=nets, teacher_params=teacher_params, states=states, mesh=mesh,
        step=train_step.stacked_train_step(config, nets, mesh, cached_teacher),
    )


@pytest.fixture(scope="session")
def single_split():
    """``make_single_split`` as a fixture."""
    return make_single_split


def write_converted_teacher(directory, config, seed=1, **arch):
    """A random ViT of ``config.model``'s architecture saved as ``fcd_jax.convert`` saves a
    converted checkpoint; ``arch`` sets its spec (``layernorm_eps``, ``image_mean``, ...)."""
    spec = dict(layernorm_eps=1e-6, gelu_approximate=False, image_mean=None, image_std=None)
    spec.update(arch)
    model = models.build_vit(dict(config.model, layernorm_eps=spec["layernorm_eps"]))
    params = models.init_params(model, config.data.image_size, jax.random.key(seed))
    fields = {field: getattr(model, field) for field in teacher.ARCH_FIELDS}
    convert.save_converted(directory, jax.device_get(params), dict(
        fields, **spec, image_size=config.data.image_size, format="test", source="test",
    ))
    return Path(directory)


@pytest.fixture
def converted_teacher(tmp_path):
    """``write_converted_teacher(config, **arch)`` into a fresh folder of this test."""
    return lambda config, **arch: write_converted_teacher(tmp_path / "teacher", config, **arch)


@pytest.fixture(scope="session")
def fast_compile_xla_flags():
    """XLA flags for cheap compilation, for subprocesses that compare programs, never speed."""
    return scale_checks.FAST_COMPILE_XLA_FLAGS


@pytest.fixture(scope="session")
def tiny_flags():
    """``fcd_jax.main`` arguments for ``configs/demo.py`` with the scale checks' tiny model."""
    return scale_checks.tiny_flags


CACHE_OPTIONS = {
    "jax_compilation_cache_dir": None,  # set per module
    "jax_persistent_cache_min_compile_time_secs": 0,
    "jax_persistent_cache_min_entry_size_bytes": -1,
}


@contextlib.contextmanager
def _shared_compilation_cache(directory: str):
    options = dict(CACHE_OPTIONS, jax_compilation_cache_dir=directory)
    before = {name: getattr(jax.config, name) for name in options}
    for name, value in options.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    try:
        yield {name.upper(): str(value) for name, value in options.items()}
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def shared_compilation_cache(tmp_path_factory):
    """JAX's persistent compilation cache in one directory per test session, for this module's
    process (restored after the module) and for its subprocesses (the environment it yields):
    every program compiles once."""
    directory = str(tmp_path_factory.getbasetemp() / "jax_compilation_cache")
    with _shared_compilation_cache(directory) as cache_env:
        yield cache_env
