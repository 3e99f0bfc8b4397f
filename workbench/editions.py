"""Student and instructor editions of the book's notebooks, and an autograder, made with otter-grader.

The chapters are the one source. A graded exercise is three consecutive cells that carry
``metadata["exercise"] = {"name": ..., "part": ...}``:

* ``prompt`` (markdown, with ``"points"``): the task;
* ``solution`` (code): a function whose solution lines sit between a ``# BEGIN SOLUTION`` and a
  ``# END SOLUTION`` comment line;
* ``grader`` (code): setup statements, then one expression calling ``workbench.grading.check`` (or
  ``workbench.lab.grade``), whose result has ``.score`` (the fraction right) and ``.passed``.

A markdown cell with ``"part": "answer"`` holds the answers to a chapter's conceptual questions.

``build`` turns each chapter into an otter-grader *master notebook* (an assignment-config cell, and
around each exercise the question, solution and hidden-test blocks otter expects; the hidden tests
are the exercise's own grader, asserted: full points when every case is right, partial credit in
quarters of the cases right) and runs ``otter assign`` on it. Per chapter it writes

* ``student/NAME.ipynb``: solutions replaced by ``...`` (so the function returns ``None`` and the
  grader, kept, says "not yet solved"), answer cells removed, outputs cleared;
* ``instructor/NAME.ipynb``: the same notebook with the solutions and answers;
* ``autograder/NAME.zip``: otter's autograder (the hidden tests), which ``autograde`` runs on a
  student's notebook to give a score per exercise.

Why otter-grader and not nbgrader: otter's assignment format lives in the notebook itself (raw
delimiter cells) and its grader runs as a library (``otter.api.grade_submission``) in the current
environment, with no course directory, database or Jupyter server extension to set up; nbgrader
needs all three and pins Jupyter's server and notebook versions. Otter's solution markers (``#
BEGIN SOLUTION`` / ``# END SOLUTION``) are plain comments, so the book's notebooks stay ordinary
notebooks that run and publish as they are; only ``build`` knows the otter format.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import WorkbenchError

__all__ = ["Exercise", "ExerciseScore", "AutogradeReport", "Built", "exercises", "master", "build", "autograde",
           "chapters", "summary", "BEGIN", "END"]

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
KEY = "exercise"
PARTS = ("prompt", "solution", "grader", "answer")
PARTIAL_STEPS = 4
_KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


@dataclass(frozen=True)
class Exercise:
    """One graded exercise of a notebook: its name, points and the indices of its three cells."""

    name: str
    points: float
    prompt: int
    solution: int
    grader: int


def _read(path: Path) -> Any:
    import nbformat

    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"{path}: no such notebook (expected a .ipynb file written by Jupyter)")
    try:
        nb = nbformat.read(str(path), as_version=4)
        nbformat.validate(nb)
    except Exception as exc:  # json, nbformat and schema errors all mean the same thing to the reader
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WorkbenchError(f"{path}: not a readable Jupyter notebook ({reason[:160]}); expected the .ipynb "
                             "file of a chapter, as saved by JupyterLab") from None
    return nb


def _meta(cell: Any) -> dict:
    meta = cell.get("metadata", {}).get(KEY)
    return meta if isinstance(meta, dict) else {}


def _solution_lines(source: str, where: str) -> None:
    """Markers on lines of their own, paired, in order, with something between them."""
    depth, seen, body = 0, 0, 0
    for line in source.split("\n"):
        s = line.strip()
        if s == BEGIN:
            if depth:
                raise WorkbenchError(f"{where}: '{BEGIN}' twice without '{END}' between")
            depth, seen, body = 1, seen + 1, 0
        elif s == END:
            if not depth:
                raise WorkbenchError(f"{where}: '{END}' without a '{BEGIN}' before it")
            if not body:
                raise WorkbenchError(f"{where}: nothing between '{BEGIN}' and '{END}'")
            depth = 0
        elif depth and s:
            body += 1
    if depth:
        raise WorkbenchError(f"{where}: '{BEGIN}' is never closed by '{END}'")
    if not seen:
        raise WorkbenchError(f"{where}: a solution cell needs its solution between a '{BEGIN}' line and an "
                             f"'{END}' line")


def _grader_parts(source: str, where: str) -> tuple[str, str]:
    """(setup statements, the final expression) of a grader cell."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise WorkbenchError(f"{where}: the grader cell is not valid Python ({exc.msg}, line {exc.lineno})") from None
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        raise WorkbenchError(f"{where}: a grader cell must end with one expression, the call to check(...) whose "
                             "result the notebook shows")
    setup = "\n".join(ast.get_source_segment(source, node) or ast.unparse(node) for node in tree.body[:-1])
    return setup, ast.unparse(tree.body[-1].value)


def exercises(nb: Any, *, where: str = "notebook") -> list[Exercise]:
    """The notebook's graded exercises, checked: each is prompt, solution and grader cells in a row."""
    found: list[Exercise] = []
    cells = nb.cells
    names: set[str] = set()
    i = 0
    while i < len(cells):
        meta = _meta(cells[i])
        part = meta.get("part")
        if not meta:
            i += 1
            continue
        at = f"{where}, cell {i}"
        if part not in PARTS:
            raise WorkbenchError(f"{at}: exercise part {part!r} is not one of {', '.join(PARTS)}")
        if part == "answer":
            if cells[i].cell_type != "markdown":
                raise WorkbenchError(f"{at}: an answer cell must be markdown")
            i += 1
            continue
        if part != "prompt":
            raise WorkbenchError(f"{at}: a {part} cell must follow its exercise's prompt (and solution) cells")
        name = meta.get("name")
        if not isinstance(name, str) or not name.isidentifier():
            raise WorkbenchError(f"{at}: exercise name {name!r} must be a Python identifier (e.g. global_mask)")
        if name in names:
            raise WorkbenchError(f"{at}: exercise {name!r} appears twice; names are unique")
        points = meta.get("points", 1)
        if isinstance(points, bool) or not isinstance(points, (int, float)) or not points > 0:
            raise WorkbenchError(f"{at}: points of {name!r} must be a number > 0, got {points!r}")
        if i + 2 >= len(cells):
            raise WorkbenchError(f"{at}: exercise {name!r} needs a solution cell and a grader cell after its prompt")
        prompt, solution, grader = cells[i], cells[i + 1], cells[i + 2]
        expected = (("markdown", "prompt", prompt), ("code", "solution", solution), ("code", "grader", grader))
        for k, (kind, want, cell) in enumerate(expected):
            got = _meta(cell)
            if cell.cell_type != kind or got.get("part") != want or got.get("name") != name:
                raise WorkbenchError(f"{where}, cell {i + k}: expected the {want} cell ({kind}) of exercise "
                                     f"{name!r}, found a {cell.cell_type} cell with exercise metadata {got or None}")
        _solution_lines(solution.source, f"{where}, cell {i + 1} (solution of {name!r})")
        _grader_parts(grader.source, f"{where}, cell {i + 2} (grader of {name!r})")
        names.add(name)
        found.append(Exercise(name, float(points), i, i + 1, i + 2))
        i += 3
    return found


def _raw(source: str) -> Any:
    import nbformat

    return nbformat.v4.new_raw_cell(source)


def master(nb: Any, name: str, *, where: str = "notebook") -> Any:
    """The otter-grader master notebook of one chapter (see the module docstring)."""
    import nbformat

    found = {e.prompt: e for e in exercises(nb, where=where)}
    config = {"name": name, "init_cell": False, "check_all_cell": False, "export_cell": False,
              "run_tests": False, "generate": True}
    out = nbformat.v4.new_notebook()
    out.metadata = copy.deepcopy(nb.metadata)
    out.metadata["kernelspec"] = dict(_KERNELSPEC)
    out.metadata.setdefault("language_info", {"name": "python"})
    out.cells = [_raw("# ASSIGNMENT CONFIG\n" + "\n".join(f"{k}: {json.dumps(v)}" for k, v in config.items()))]
    i = 0
    while i < len(nb.cells):
        ex = found.get(i)
        if ex is None:
            out.cells.append(copy.deepcopy(nb.cells[i]))
            i += 1
            continue
        prompt, solution, grader = (copy.deepcopy(nb.cells[k]) for k in (ex.prompt, ex.solution, ex.grader))
        tags = [t for t in solution.metadata.get("tags", []) if t not in ("hide-input", "hide-cell")]
        solution.metadata["tags"] = tags
        setup, call = _grader_parts(grader.source, where)
        # Partial credit in quarters: otter splits a question's points evenly over its test cases, and
        # test k asks for at least k/4 of the grade (the fraction of the grader's cases right).
        tests = [nbformat.v4.new_code_cell(
            '""" # BEGIN TEST CONFIG\nhidden: true\n""" # END TEST CONFIG\n' + (setup + "\n" if setup else "")
            + f"_grade = {call}\nassert _grade.score >= {k}/{PARTIAL_STEPS} - 1e-9, str(_grade)")
            for k in range(1, PARTIAL_STEPS + 1)]
        out.cells += [_raw(f"# BEGIN QUESTION\nname: {ex.name}\npoints: {ex.points:g}\ncheck_cell: false"), prompt,
                      _raw("# BEGIN SOLUTION"), solution, _raw("# END SOLUTION"),
                      _raw("# BEGIN TESTS"), *tests, _raw("# END TESTS"),
                      _raw("# END QUESTION"), grader]
        i = ex.grader + 1
    return out


def _student(nb: Any) -> Any:
    nb.cells = [c for c in nb.cells if _meta(c).get("part") != "answer"]
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    return nb


def _write_atomic(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Built:
    """What ``build`` wrote for one chapter."""

    notebook: str
    exercises: tuple[Exercise, ...]
    student: Path
    instructor: Path
    autograder: Path


def build(notebooks: Iterable[str | os.PathLike], out: str | os.PathLike, *,
          which: Sequence[str] = ("student", "instructor")) -> list[Built]:
    """Write the editions named in `which` of each notebook under `out`: ``student`` (with the
    autograder, ``autograder/NAME.zip``) and/or ``instructor``."""
    import nbformat
    from otter.assign import main as otter_assign

    out = Path(out).resolve()
    unknown = set(which) - {"student", "instructor"}
    if unknown or not which:
        raise WorkbenchError(f"editions are student and instructor, got {sorted(unknown) or 'none'}")
    paths = [Path(p) for p in notebooks]
    if not paths:
        raise WorkbenchError("no notebooks given: name the chapters to build editions of")
    books = {p: _read(p) for p in paths}
    found = {p: tuple(exercises(nb, where=str(p))) for p, nb in books.items()}
    seen: dict[str, Path] = {}
    for p, exs in found.items():
        for ex in exs:
            if ex.name in seen:
                raise WorkbenchError(f"{p}: exercise {ex.name!r} is also in {seen[ex.name]}; names are unique "
                                     "across the book (the autograder finds exercises by name)")
            seen[ex.name] = p
    built = []
    for p, nb in books.items():
        stem = p.stem
        with tempfile.TemporaryDirectory(prefix="workbench-edition-") as tmp:
            src = Path(tmp) / f"{stem}.ipynb"
            nbformat.write(master(nb, stem, where=str(p)), str(src))
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                try:
                    otter_assign(str(src), str(Path(tmp) / "dist"), no_pdfs=True)
                except Exception as exc:
                    raise WorkbenchError(f"{p}: otter assign failed: {str(exc).strip()[:300]}") from None
            dist = Path(tmp) / "dist"
            student = _student(nbformat.read(str(dist / "student" / f"{stem}.ipynb"), as_version=4))
            instructor = nbformat.read(str(dist / "autograder" / f"{stem}.ipynb"), as_version=4)
            for c in instructor.cells:
                if c.cell_type == "code":
                    c.outputs, c.execution_count = [], None
            zips = sorted((dist / "autograder").glob("*.zip"))
            if len(zips) != 1:
                raise WorkbenchError(f"{p}: otter assign wrote {len(zips)} autograder zips, expected one")
            targets = (out / "student" / f"{stem}.ipynb", out / "instructor" / f"{stem}.ipynb",
                       out / "autograder" / f"{stem}.zip")
            if "student" in which:
                _write_atomic(targets[0], nbformat.writes(student))
                _write_atomic(targets[2], zips[0].read_bytes())
            if "instructor" in which:
                _write_atomic(targets[1], nbformat.writes(instructor))
        built.append(Built(str(p), found[p], *targets))
    return built


@dataclass(frozen=True)
class ExerciseScore:
    name: str
    score: float
    possible: float
    message: str


@dataclass(frozen=True)
class AutogradeReport:
    """The autograder's verdict on one submitted notebook: a score per exercise."""

    submission: str
    exercises: tuple[ExerciseScore, ...]

    @property
    def score(self) -> float:
        return sum(e.score for e in self.exercises)

    @property
    def possible(self) -> float:
        return sum(e.possible for e in self.exercises)

    def __str__(self) -> str:
        width = max([len(e.name) for e in self.exercises] + [8])
        lines = [f"{self.submission}: {self.score:g}/{self.possible:g} points"]
        lines += [f"  {'✓' if e.score >= e.possible else '✗'} {e.name:<{width}} {e.score:g}/{e.possible:g}  {e.message}"
                  for e in self.exercises]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"submission": self.submission, "score": self.score, "possible": self.possible,
                "exercises": [e.__dict__ for e in self.exercises]}


def _reason(result: Any) -> str:
    """The one line that says why a hidden test failed (the grader's message), or 'right'."""
    failed = [r for r in getattr(result, "test_case_results", []) if not r.passed]
    if not failed:
        return "right"
    text = failed[0].message or ""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("AssertionError:"):
            return line.removeprefix("AssertionError:").strip().removeprefix("✗ ")[:240]
    last = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (last[-1] if last else "the hidden test failed")[:240]


def autograde(submission: str | os.PathLike, autograder: str | os.PathLike | None = None, *,
              editions: str | os.PathLike = "_build/editions") -> AutogradeReport:
    """Run the chapter's autograder on a student's notebook; return the score of each exercise.

    `autograder` defaults to ``EDITIONS/autograder/<submission's name>.zip`` (``make student`` writes
    it). The submission runs top to bottom in a fresh kernel of this environment; graders are not
    strict there (a reader's notebook never raises), the hidden tests then assert each grade.
    """
    submission = Path(submission)
    _read(submission)  # a missing or corrupt notebook is named here, before otter runs anything
    if autograder is None:
        stem = submission.stem
        autograder = Path(editions) / "autograder" / f"{stem}.zip"
        if not autograder.is_file():
            raise WorkbenchError(f"{autograder}: no autograder for {submission.name} (expected one named after a "
                                 "chapter, e.g. 02_pruning.ipynb; run `make student` first, or pass --autograder)")
    autograder = Path(autograder)
    if not autograder.is_file():
        raise WorkbenchError(f"{autograder}: no such autograder (expected the .zip that `make student` writes)")
    import zipfile

    if not zipfile.is_zipfile(autograder):
        raise WorkbenchError(f"{autograder}: not a zip file (expected an otter autograder written by `make student`)")
    from otter.api import grade_submission

    from .grading import STRICT_ENV

    saved = os.environ.pop(STRICT_ENV, None)
    try:
        with tempfile.TemporaryDirectory(prefix="workbench-autograde-") as tmp:
            # otter grades a copy; keep the student's file untouched whatever the notebook does.
            copy_path = Path(tmp) / submission.name
            shutil.copyfile(submission, copy_path)
            with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
                results = grade_submission(str(copy_path), str(autograder.resolve()), quiet=True)
    except WorkbenchError:
        raise
    except Exception as exc:
        raise WorkbenchError(f"{submission}: the autograder could not run it ({str(exc).strip()[:240]})") from None
    finally:
        if saved is not None:
            os.environ[STRICT_ENV] = saved
    scores = tuple(ExerciseScore(name, float(r.score), float(r.possible), _reason(r))
                   for name, r in results.results.items())
    return AutogradeReport(str(submission), scores)


def chapters(folder: str | os.PathLike = "notebooks") -> list[Path]:
    """The book's chapter notebooks (those with graded exercises, the appendix excluded)."""
    return sorted(Path(folder).glob("[0-9][0-9]_*.ipynb"))


def summary(built: Sequence[Built]) -> str:
    lines = [f"{len(built)} notebooks, {sum(len(b.exercises) for b in built)} graded exercises"]
    lines += [f"  {Path(b.notebook).name:<28} {len(b.exercises)} exercises: {', '.join(e.name for e in b.exercises)}"
              for b in built]
    return "\n".join(lines)
