"""Reliability sweep (issue 15): bad and unusual inputs through the CLI, as a user types them.

    python -m benchmarks.reliability_sweep [--only REGEX] [--fresh] [--out FILE]

Every case of ``benchmarks/reliability_cases.py`` builds its inputs in a folder of its own (tiny
generated image folders; ``configs/folder.py:runlocal`` with a random teacher, 2 steps), runs
``python -m fcd_jax.main ...`` (or ``python -m fcd_jax.convert``) and records the input, the exit
code, the last stderr line and a verdict:

- an input that cannot work is **handled** when the command exits 2 with exactly one
  ``fcd_jax: error:`` line, no traceback, before any training step (convert's convention: exit 1,
  one ``error:`` line). A run that reaches the training progress bar is stopped there: the check
  came too late ("reached training"), whatever it would have said afterwards;
- a legitimate odd case is **handled** when the command succeeds (exit 0, no traceback) and the
  case's own check of what it wrote passes;
- either way, the user's files (the inputs, and what the workdir held before) are hashed before
  and after: one changed or deleted file makes the case **not handled**.

Speed: by default each command runs in a child forked from this process once it has imported
fcd_jax's dependencies (jax, flax, orbax, matplotlib, ...; no JAX backend is started here). The
child runs ``fcd_jax.main`` as ``__main__`` with the case's argv, cwd, environment and stdio,
as ``python -m`` does, without paying the ~10 s of imports per case. ``--fresh`` runs real
``python -m`` subprocesses instead (slower; the same verdicts).

Writes ``benchmarks/results/reliability_sweep.md``: counts per class, then one row per case.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ sits beside fcd_jax/ and is not installed
    sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "reliability_sweep.md"
CHILD_ENV = {
    "PYTHONPATH": str(ROOT),  # configs/ is imported from the repository, as in the README
    "OMP_WAIT_POLICY": "PASSIVE",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "JAX_PLATFORMS": "cpu",
    "JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(), "fcd_jax_sweep_compile_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1",
}
ERROR_PREFIX = {"fcd_jax.main": "fcd_jax: error: ", "fcd_jax.convert": "error: "}
TRAINING_STARTED = re.compile(r"(^|[\r\n])train [^\r\n:]*: ")  # the training progress bar


@dataclasses.dataclass
class Invocation:
    """One command line: ``python -m <module> <args>`` in ``cwd``."""

    args: list[str]
    cwd: Path
    module: str = "fcd_jax.main"
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    expect: str = ""  # "" = the case's


@dataclasses.dataclass
class Outcome:
    rc: int | None  # None: stopped (reached training, or timed out)
    stdout: str
    stderr: str
    stopped: str = ""  # "reached training" | "timed out"
    seconds: float = 0.0


@dataclasses.dataclass
class Case:
    """One input. ``build(folder)`` writes the inputs and returns the command(s) to run at once,
    and the paths whose files are the user's (hashed before and after)."""

    kind: str  # the class, e.g. "5 tracebacks"
    name: str  # the input, as the table shows it
    expect: str  # "error" | "success" | "either"
    build: Callable[[Path], tuple[list[Invocation], list[Path]]]
    check: Callable[[Path, list[Outcome]], str | None] | None = None  # success: None if right
    forbid: str = ""  # a regex the last stderr line must not match (e.g. a wrong field name)
    require: str = ""  # a regex the last stderr line must match (e.g. the field meant)
    concurrent: bool = False  # the invocations run at once, else one after the other
    after: Callable[[Path], None] | None = None  # undoes what build did outside ``folder``
    late: bool = False  # an error that can only show while writing (a full disk): not stopped
    exclusive: bool = False  # runs alone: it makes what later cases use, or moves shared files
    timeout: float = 240.0


# --- Running commands -----------------------------------------------------------------------


def preload() -> None:
    """Imports what fcd_jax's CLI imports (not fcd_jax.main: the child runs it as __main__)."""
    os.environ.update(CHILD_ENV)
    import fcd_jax.convert  # noqa: F401
    import fcd_jax.experiment  # noqa: F401
    import fcd_jax.predict  # noqa: F401


def _child(invocation: Invocation, stdout: Path, stderr: Path) -> None:
    """In the forked child: become ``python -m <module> <args>``; never returns."""
    code = 1
    try:
        os.chdir(invocation.cwd)
        for fd, path in ((1, stdout), (2, stderr)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.environ.update(invocation.env)
        sys.argv = [invocation.module.replace(".", "/") + ".py", *invocation.args]
        sys.path[0] = str(invocation.cwd)  # as python -m: the working directory first
        try:
            runpy.run_module(invocation.module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit_:
            if exit_.code is None or isinstance(exit_.code, int):
                code = exit_.code or 0
            else:
                print(exit_.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _start(invocation: Invocation, stdout: Path, stderr: Path, fresh: bool):
    """A handle with ``poll() -> rc | None`` and ``kill()``: a forked child or a subprocess.

    The log files exist when this returns (the parent reads them while the child runs)."""
    for path in (stdout, stderr):
        path.touch()
    if fresh:
        env = dict(os.environ, **CHILD_ENV, **invocation.env)
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            command = [sys.executable, "-m", invocation.module, *invocation.args]
            return subprocess.Popen(command, cwd=invocation.cwd, env=env, stdout=out, stderr=err)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(invocation, stdout, stderr)
    return _Forked(pid)


class _Forked:
    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self.returncode = -signal.SIGKILL


def _run_at_once(invocations: Sequence[Invocation], logs: Sequence[tuple[Path, Path]],
                 stop_at_training: Sequence[bool], timeout: float,
                 fresh: bool) -> Iterator[None]:  # fmt: skip
    """Runs the invocations at once, yielding while they run; returns their outcomes."""
    started = time.monotonic()
    handles = [_start(inv, *log, fresh) for inv, log in zip(invocations, logs, strict=True)]
    stopped = [""] * len(handles)
    while any(h.poll() is None for h in handles):
        yield
        for i, handle in enumerate(handles):
            if handle.poll() is not None:
                continue
            if time.monotonic() - started > timeout:
                stopped[i] = "timed out"
            elif stop_at_training[i] and TRAINING_STARTED.search(
                logs[i][1].read_text(errors="replace")
            ):
                stopped[i] = "reached training"
            if stopped[i]:
                handle.kill()
    seconds = time.monotonic() - started
    return [
        Outcome(None if stop else handle.poll(), out.read_text(errors="replace"),
                err.read_text(errors="replace"), stop, seconds)  # fmt: skip
        for handle, (out, err), stop in zip(handles, logs, stopped, strict=True)
    ]


def run_all(case: Case, invocations: Sequence[Invocation], folder: Path,
            fresh: bool) -> Iterator[None]:  # fmt: skip
    """Runs the case's invocations (at once, or one after the other), yielding while they run;
    one that reaches training where an error is expected is stopped there."""
    logs = [(folder / f"stdout{i}.txt", folder / f"stderr{i}.txt") for i in range(len(invocations))]
    stops = [(inv.expect or case.expect) == "error" and not case.late for inv in invocations]
    if case.concurrent:
        return (yield from _run_at_once(invocations, logs, stops, case.timeout, fresh))
    outcomes = []
    for inv, log, stop in zip(invocations, logs, stops, strict=True):
        outcomes += yield from _run_at_once([inv], [log], [stop], case.timeout, fresh)
    return outcomes


# --- Verdicts -------------------------------------------------------------------------------


def snapshot(paths: Sequence[Path]) -> dict[str, str]:
    """``{file: sha256}`` of every file under ``paths`` (a symlink: where it points)."""
    hashes = {}
    for top in paths:
        files = [top] if not top.is_dir() or top.is_symlink() else sorted(top.rglob("*"))
        for path in files:
            if path.is_symlink():
                hashes[str(path)] = "-> " + os.readlink(path)
            elif path.is_file():
                try:
                    hashes[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
                except OSError as error:  # unreadable on purpose (a case's permissions)
                    hashes[str(path)] = f"unreadable: {error.errno}"
    return hashes


def lost_files(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """The files of ``before`` that are gone or changed in ``after``."""
    return sorted(path for path, digest in before.items() if after.get(path) != digest)


def last_line(text: str) -> str:
    lines = [line for line in re.split(r"[\r\n]+", text) if line.strip()]
    return lines[-1].strip() if lines else ""


def error_verdict(outcome: Outcome, module: str) -> str | None:
    """None if ``outcome`` is a handled error, else what is wrong with it."""
    if outcome.stopped:
        return outcome.stopped
    if "Traceback (most recent call last)" in outcome.stderr:
        return "traceback"
    expected_rc = 1 if module == "fcd_jax.convert" else 2
    if outcome.rc != expected_rc:
        return f"exit {outcome.rc}"
    prefix = ERROR_PREFIX.get(module, "fcd_jax: error: ")
    errors = [line for line in outcome.stderr.splitlines() if line.startswith(prefix)]
    if len(errors) != 1 or errors[0] != last_line(outcome.stderr):
        return f"{len(errors)} error lines"
    return None


def success_verdict(outcome: Outcome) -> str | None:
    if outcome.stopped:
        return outcome.stopped
    if "Traceback (most recent call last)" in outcome.stderr:
        return "traceback"
    return None if outcome.rc == 0 else f"exit {outcome.rc}"


def judge(case: Case, invocations: list[Invocation], outcomes: list[Outcome], folder: Path,
          lost: list[str]) -> str:  # fmt: skip
    """"handled" or "not handled: <why>"."""
    problems = []
    for invocation, outcome in zip(invocations, outcomes, strict=True):
        expect = invocation.expect or case.expect
        as_error = error_verdict(outcome, invocation.module)
        as_success = success_verdict(outcome)
        if expect == "error":
            problems.append(as_error)
        elif expect == "success":
            problems.append(as_success)
        else:
            problems.append(None if as_error is None or as_success is None else as_error)
        wrong = re.search(case.forbid, last_line(outcome.stderr)) if case.forbid else None
        if wrong:
            problems.append(f"message says {wrong[0]!r}")
        if case.require and not re.search(case.require, last_line(outcome.stderr)):
            problems.append(f"message lacks {case.require!r}")
    if case.check and (case.expect == "error" or not any(problems)):  # errors: e.g. no code ran
        problems.append(case.check(folder, outcomes))
    if lost:
        problems.append(f"{len(lost)} user file(s) changed or lost")
    problems = [p for p in problems if p]
    return "handled" if not problems else "not handled: " + "; ".join(dict.fromkeys(problems))


# --- The sweep and its table -----------------------------------------------------------------


@dataclasses.dataclass
class Row:
    case: Case
    rc: str
    line: str
    verdict: str
    files: str
    seconds: float


def run_case(case: Case, base: Path, fresh: bool, shared_paths: dict[str, Path]) -> Iterator:
    """Builds, runs and judges one case, yielding while its commands run; returns its Row."""
    folder = base / re.sub(r"[^A-Za-z0-9]+", "_", f"{case.kind}_{case.name}")[:80]
    folder.mkdir(parents=True)
    try:
        invocations, protected = case.build(folder)
    except Exception as error:  # a broken case must not stop the sweep
        return Row(case, "-", f"case setup failed: {error!r}"[:160], "not run", "-", 0.0)
    before = snapshot(protected)
    try:
        outcomes = yield from run_all(case, invocations, folder, fresh)
        lost = lost_files(before, snapshot(protected))
    finally:
        if case.after:
            case.after(folder)
    verdict = judge(case, invocations, outcomes, folder, lost)
    rc = ", ".join(o.stopped or str(o.rc) for o in outcomes) or "-"
    line = " / ".join(last_line(o.stderr) for o in outcomes)
    labels = {str(folder): "<case>", **{str(p): f"<{k}>" for k, p in shared_paths.items()}}
    for path in sorted(labels, key=len, reverse=True):  # the longest (innermost) first
        line, verdict = line.replace(path, labels[path]), verdict.replace(path, labels[path])
    files = f"{len(before)} unchanged" if not lost else "CHANGED: " + ", ".join(
        Path(p).name for p in lost[:3])
    return Row(case, rc, line, verdict, files, sum(o.seconds for o in outcomes))


def _cell(text: str, width: int = 170) -> str:
    text = text if len(text) <= width else text[: width - 3] + "..."
    return text.replace("|", "\\|").replace("\n", " ")


def write_table(rows: Sequence[Row], path: Path, seconds: float, command: str) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                            capture_output=True).stdout.strip()  # fmt: skip
    per_class: dict[str, Counter] = {}
    for row in rows:
        per_class.setdefault(row.case.kind, Counter())[row.verdict.split(":")[0]] += 1
    lines = [
        "# Reliability sweep (issue 15)", "",
        f"`{command}` at commit {commit}: {len(rows)} inputs in {seconds / 60:.1f} min. "
        "Generated by benchmarks/reliability_sweep.py; the verdict rules are in its docstring.",
        "", "| class | inputs | handled | not handled |", "|---|---|---|---|",
    ]  # fmt: skip
    for kind, counts in sorted(per_class.items()):
        lines.append(f"| {kind} | {sum(counts.values())} | {counts['handled']} | "
                     f"{sum(counts.values()) - counts['handled']} |")  # fmt: skip
    total = Counter(row.verdict.split(":")[0] for row in rows)
    lines += [f"| **all** | {len(rows)} | {total['handled']} | "
              f"{len(rows) - total['handled']} |", "",
              "| # | class | input | exit | last stderr line | verdict | user files | s |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for number, row in enumerate(rows, 1):
        lines.append(
            f"| {number} | {row.case.kind} | {_cell(row.case.name, 90)} | {row.rc} | "
            f"`{_cell(row.line).replace('`', chr(39))}` | {_cell(row.verdict, 90)} | "
            f"{_cell(row.files, 60)} | {row.seconds:.0f} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def run_cases(cases: Sequence[Case], base: Path, fresh: bool, jobs: int,
              shared: dict) -> list[Row]:  # fmt: skip
    """Runs up to ``jobs`` cases at once (all in this thread: children are forked from it); an
    ``exclusive`` case runs alone, so that what it makes or moves is there for the next ones."""
    rows: dict[int, Row] = {}
    active: dict[int, Iterator] = {}
    waiting = list(enumerate(cases))
    while waiting or active:
        while waiting and len(active) < jobs and not any(cases[i].exclusive for i in active) \
                and not (waiting[0][1].exclusive and active):  # fmt: skip
            index, case = waiting.pop(0)
            paths = {k: v for k, v in shared.items() if isinstance(v, Path)}
            active[index] = run_case(case, base, fresh, paths)
        for index, steps in list(active.items()):
            try:
                next(steps)
            except StopIteration as done:
                row = rows[index] = done.value
                del active[index]
                print(f"[{len(rows)}/{len(cases)}] {row.seconds:5.1f}s {row.case.kind} | "
                      f"{row.case.name} | {row.rc} | {row.verdict}", flush=True)  # fmt: skip
        time.sleep(0.2)
    return [rows[i] for i in range(len(cases))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="run the cases whose class or input matches "
                        "this regular expression (e.g. 'clean folder|11 workdirs')")
    parser.add_argument("--fresh", action="store_true", help="real python -m subprocesses")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once")
    args = parser.parse_args(argv)
    from benchmarks import reliability_cases

    cases = [c for c in reliability_cases.CASES if re.search(args.only, f"{c.kind} {c.name}")]
    if not args.fresh:
        preload()
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="fcd_sweep_"))
    try:
        rows = run_cases(cases, base, args.fresh, args.jobs, reliability_cases.SHARED)
    finally:
        reliability_cases.cleanup()
        shutil.rmtree(base, ignore_errors=True)
    command = "python -m benchmarks.reliability_sweep" + (" --fresh" if args.fresh else "")
    write_table(rows, args.out, time.monotonic() - started, command)
    handled = sum(row.verdict == "handled" for row in rows)
    print(f"{handled} of {len(rows)} handled; table in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
