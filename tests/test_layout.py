"""The package's layout: predict needs only the scoring side, and each module says what it holds."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fcd_jax"
TRAINER = ("fcd_jax.experiment", "fcd_jax.group_trainer", "fcd_jax.train_step",
           "fcd_jax.train_state", "fcd_jax.teacher_cache", "fcd_jax.sizing")


def test_predict_imports_neither_tensorboard_nor_the_trainer():
    check = (
        "import sys, fcd_jax.predict; "
        "print(sorted(m for m in sys.modules if m.startswith(('tensorboardX', 'fcd_jax.'))))"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          timeout=300, cwd=PACKAGE.parent, check=True)
    modules = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert "fcd_jax.evaluate" in modules  # what predict scores with
    assert not [m for m in modules if m.startswith("tensorboardX") or m in TRAINER], modules


def test_every_module_has_a_docstring():
    for path in sorted(PACKAGE.rglob("*.py")):
        assert ast.get_docstring(ast.parse(path.read_text())), path
