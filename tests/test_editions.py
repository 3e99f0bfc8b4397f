"""Student and instructor editions (workbench/editions.py, otter-grader) and the course structure of every chapter.

The instructor edition passing every grader is proved by the book build and the notebook tests, which
run the chapters with WORKBENCH_GRADING_STRICT=1 (the Makefile's BOOK_ENV): a grader that fails raises.
Here: the student edition of every chapter runs to the end with every grader saying "not yet solved";
the autograder scores a toy chapter per exercise (nothing, everything, partial credit) and names a
missing or corrupt file; every chapter has learning goals, a summary with glued numbers, two graded
exercises or more and answers to its questions.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbformat
import pytest

from workbench import WorkbenchError, editions
from workbench.grading import STRICT_ENV

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = editions.chapters(ROOT / "notebooks")
C = nbformat.v4


def _exercise(name, solution, grader, points=1):
    return [C.new_markdown_cell(f"### Exercise: {name}", metadata={"exercise": {"name": name, "part": "prompt",
                                                                                 "points": points}}),
            C.new_code_cell(solution, metadata={"exercise": {"name": name, "part": "solution"}, "tags": ["hide-input"]}),
            C.new_code_cell(grader, metadata={"exercise": {"name": name, "part": "grader"}})]


def toy() -> nbformat.NotebookNode:
    nb = C.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [C.new_markdown_cell("# 99. Toy"), C.new_code_cell("import torch\nfrom workbench.grading import case, check")]
    nb.cells += _exercise("double_it", 'def double_it(x):\n    """Return 2x."""\n    # BEGIN SOLUTION\n    return 2 * x\n'
                                       "    # END SOLUTION",
                          'X = torch.arange(6.0)\ncheck("double_it", double_it, lambda x: x * 2, [case(X), case(-X)])')
    nb.cells.append(C.new_code_cell("print('the chapter goes on with the workbench')"))
    nb.cells += _exercise("square_it", "def square_it(x):\n    # BEGIN SOLUTION\n    return x * x\n    # END SOLUTION",
                          'check("square_it", square_it, torch.square, [case(torch.arange(4.0)), case(torch.ones(2))])',
                          points=2)
    nb.cells += [C.new_markdown_cell("## Exercises\n1. Why?"),
                 C.new_markdown_cell("```{admonition} Answers\n:class: dropdown\n1. Because.\n```",
                                     metadata={"exercise": {"name": "toy_answers", "part": "answer"}})]
    return nb


# ---- the format -------------------------------------------------------------------------------------------

def test_exercises_are_found_with_their_points():
    found = editions.exercises(toy())
    assert [(e.name, e.points, e.prompt, e.solution, e.grader) for e in found] == [
        ("double_it", 1.0, 2, 3, 4), ("square_it", 2.0, 6, 7, 8)]


@pytest.mark.parametrize("breakage, message", [
    (lambda nb: setattr(nb.cells[3], "source", "def double_it(x):\n    return 2 * x"), "BEGIN SOLUTION"),
    (lambda nb: setattr(nb.cells[3], "source", "def f(x):\n    # BEGIN SOLUTION\n    return x"), "never closed"),
    (lambda nb: setattr(nb.cells[3], "source", "def f(x):\n    # BEGIN SOLUTION\n    # END SOLUTION"), "nothing between"),
    (lambda nb: setattr(nb.cells[4], "source", "x = check"), "must end with one expression"),
    (lambda nb: setattr(nb.cells[4], "source", "check(("), "not valid Python"),
    (lambda nb: nb.cells.pop(3), "expected the solution cell"),
    (lambda nb: nb.cells[6].metadata["exercise"].update(name="double_it"), "appears twice"),
    (lambda nb: nb.cells[6].metadata["exercise"].update(name="not a name"), "Python identifier"),
    (lambda nb: nb.cells[2].metadata["exercise"].update(points=0), "points"),
    (lambda nb: nb.cells[2].metadata["exercise"].update(part="hint"), "not one of"),
    (lambda nb: nb.cells.pop(2), "must follow its exercise's prompt"),
])
def test_a_malformed_exercise_is_named_in_one_line(breakage, message):
    nb = toy()
    breakage(nb)
    with pytest.raises(WorkbenchError, match=message) as err:
        editions.exercises(nb, where="toy.ipynb")
    assert "\n" not in str(err.value) and "toy.ipynb, cell" in str(err.value)


def test_the_master_has_otters_blocks_and_the_grader_as_hidden_tests():
    m = editions.master(toy(), "toy")
    raw = [c.source.splitlines()[0] for c in m.cells if c.cell_type == "raw"]
    assert raw[0] == "# ASSIGNMENT CONFIG"
    assert raw.count("# BEGIN QUESTION") == raw.count("# END QUESTION") == 2
    tests = [c.source for c in m.cells if c.cell_type == "code" and "BEGIN TEST CONFIG" in c.source]
    assert len(tests) == 2 * editions.PARTIAL_STEPS and all("hidden: true" in t for t in tests)
    assert 'assert _grade.score >= 4/4 - 1e-9' in tests[3] and "X = torch.arange(6.0)" in tests[0]
    # the visible grader stays, after the question, and the solution is no longer hidden
    assert sum(c.source.startswith('X = torch.arange(6.0)\ncheck(') for c in m.cells) == 1
    assert all("hide-input" not in c.metadata.get("tags", []) for c in m.cells)


# ---- build and autograde (a toy chapter: fast) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("editions")
    src = tmp / "99_toy.ipynb"
    nbformat.write(toy(), str(src))
    out = tmp / "out"
    return tmp, editions.build([src], out, which=["student"]), out


def _sources(path):
    return [c.source for c in nbformat.read(str(path), as_version=4).cells]


def test_the_student_edition_has_no_solutions_and_no_answers(built):
    _, (b,), out = built
    text = "\n".join(_sources(b.student))
    assert "BEGIN SOLUTION" not in text and "return 2 * x" not in text and "Because." not in text
    assert 'def double_it(x):\n    """Return 2x."""\n    ...' in text            # the docstring stays
    assert text.count("check(") == 2 and "the chapter goes on" in text         # graders and the chapter stay
    assert b.autograder.is_file() and not b.instructor.exists()                # `make student` writes no solutions


def test_the_instructor_edition_keeps_solutions_and_answers(built):
    tmp, _, out = built
    (b,) = editions.build([tmp / "99_toy.ipynb"], out, which=["instructor"])
    text = "\n".join(_sources(b.instructor))
    assert "return 2 * x" in text and "Because." in text and text.count("check(") == 2


def test_the_autograder_scores_each_exercise(built, tmp_path, monkeypatch):
    monkeypatch.setenv(STRICT_ENV, "1")   # the autograder is never strict inside the student's kernel
    _, (b,), out = built
    report = editions.autograde(b.student, editions=out)
    assert [(e.name, e.score, e.possible) for e in report.exercises] == [("double_it", 0, 1), ("square_it", 0, 2)]
    assert all("not yet solved" in e.message for e in report.exercises)
    assert str(report).splitlines()[0].endswith("0/3 points")

    nb = nbformat.read(str(b.student), as_version=4)
    for cell in nb.cells:   # a student who solved double_it, and half of square_it's cases
        if cell.source.startswith("def double_it"):
            cell.source = "def double_it(x):\n    return x + x"
        elif cell.source.startswith("def square_it"):
            cell.source = "def square_it(x):\n    return x * x + (x > 2)"
    sub = tmp_path / "99_toy.ipynb"
    nbformat.write(nb, str(sub))
    report = editions.autograde(sub, editions=out)
    assert [(e.score, e.possible) for e in report.exercises] == [(1, 1), (1, 2)]
    assert report.exercises[0].message == "right"
    assert "wrong values" in report.exercises[1].message and "[1/2 cases right]" in report.exercises[1].message
    assert json.loads(json.dumps(report.to_dict()))["score"] == 2
    assert os.environ[STRICT_ENV] == "1"   # restored


def test_the_autograder_names_a_missing_or_corrupt_file(built, tmp_path):
    _, (b,), out = built
    with pytest.raises(WorkbenchError, match=r"no such notebook \(expected a \.ipynb"):
        editions.autograde(tmp_path / "99_toy.ipynb", editions=out)
    bad = tmp_path / "99_toy.ipynb"
    bad.write_text('{"cells": [')
    with pytest.raises(WorkbenchError, match=r"99_toy.ipynb: not a readable Jupyter notebook"):
        editions.autograde(bad, editions=out)
    bad.write_text(json.dumps({"cells": "nope", "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    with pytest.raises(WorkbenchError, match="not a readable Jupyter notebook"):
        editions.autograde(bad, editions=out)
    other = tmp_path / "other.ipynb"
    other.write_text(b.student.read_text())
    with pytest.raises(WorkbenchError, match=r"other.zip: no autograder for other.ipynb"):
        editions.autograde(other, editions=out)
    notzip = tmp_path / "ag.zip"
    notzip.write_text("hello")
    with pytest.raises(WorkbenchError, match="ag.zip: not a zip file"):
        editions.autograde(b.student, notzip)


def test_the_cli_prints_one_line_errors(capsys, tmp_path):
    from workbench.cli import main

    assert main(["autograde", str(tmp_path / "02_pruning.ipynb")]) == 2
    assert "no such notebook" in capsys.readouterr().err
    assert main(["edition", "student", str(tmp_path / "x.ipynb"), "--out", str(tmp_path)]) == 2


# ---- the book's chapters ------------------------------------------------------------------------------------

def test_there_are_chapters():
    assert len(CHAPTERS) >= 13, CHAPTERS


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_chapter_is_a_course_unit(path):
    nb = nbformat.read(str(path), as_version=4)
    md = [c.source for c in nb.cells if c.cell_type == "markdown"]
    goals = next((s for s in md[:3] if "{admonition} Learning goals" in s), None)
    assert goals, f"{path.name}: the learning goals come first (an admonition titled 'Learning goals')"
    assert 3 <= len(re.findall(r"^\s*\d+\.\s", goals, flags=re.M)) <= 5, f"{path.name}: 3 to 5 learning goals"
    summary = next((s for s in md if s.startswith("## Summary")), None)
    assert summary and "{glue:" in summary, f"{path.name}: a '## Summary' with glued numbers"
    found = editions.exercises(nb, where=path.name)
    assert len(found) >= 2, f"{path.name}: {len(found)} graded exercises, expected two or more"
    assert any(c.metadata.get("exercise", {}).get("part") == "answer" for c in nb.cells), \
        f"{path.name}: the conceptual questions' answers (an 'answer' cell)"
    names = [e.name for e in found]
    for ex in found:   # no cell after the solution may use the reader's function, but its grader
        fn = re.search(r"^def (\w+)", nb.cells[ex.solution].source, flags=re.M).group(1)
        later = [i for i, c in enumerate(nb.cells) if i > ex.grader and c.cell_type == "code"
                 and re.search(rf"\b{fn}\b", c.source)]
        assert not later, f"{path.name}: cells {later} use the reader's {fn} (None in the student edition)"
    assert len(set(names)) == len(names)


def test_exercise_names_are_unique_across_the_book():
    seen = {}
    for path in CHAPTERS:
        for ex in editions.exercises(nbformat.read(str(path), as_version=4), where=path.name):
            assert ex.name not in seen, f"{ex.name} in {path.name} and {seen[ex.name]}"
            seen[ex.name] = path.name


# ---- the student edition of every chapter runs -------------------------------------------------------------

@pytest.fixture(scope="module")
def student_editions(tmp_path_factory):
    out = tmp_path_factory.mktemp("book-editions")
    return {Path(b.notebook).stem: b for b in editions.build(CHAPTERS, out, which=["student"])}


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_the_student_edition_runs_and_every_grader_says_not_yet_solved(path, student_editions, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.delenv(STRICT_ENV, raising=False)   # a reader's notebook: graders never raise
    monkeypatch.setenv("WORKBENCH_PROGRESS", "0")
    b = student_editions[path.stem]
    nb = nbformat.read(str(b.student), as_version=4)
    # Run where the chapter lives, as a student would after copying it into notebooks/.
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    graders = [c for c in nb.cells if c.metadata.get("exercise", {}).get("part") == "grader"]
    assert len(graders) == len(b.exercises) >= 2
    for cell in graders:
        shown = " ".join(o.get("data", {}).get("text/plain", "") + o.get("text", "") for o in cell.outputs)
        assert "not yet solved" in shown, f"{path.name}: grader of {cell.metadata['exercise']['name']} showed {shown!r}"


def test_the_autograder_gives_the_instructor_edition_of_the_lab_full_marks(student_editions, tmp_path):
    # The lab's hidden tests are its graders (lab.grade on the reader's submission): the book's
    # solution must score every point when otter runs it as a student's notebook.
    lab_path = next(p for p in CHAPTERS if p.stem == "13_lab")
    (built,) = editions.build([lab_path], tmp_path, which=["instructor"])
    report = editions.autograde(built.instructor, student_editions["13_lab"].autograder)
    assert report.score == report.possible == sum(e.points for e in built.exercises), str(report)
