"""Sessions behind the README's commands: ``nox -s tests``, ``lint``, ``demo``."""

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Install blockbench with its test extras and run the whole suite (real SmolLM2 included)."""
    session.install("-e", ".[test]")
    session.run("pytest", "-q", "-p", "no:cacheprovider", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.5")
    session.run("ruff", "check", "bench", "algorithms", "estimators", "tests", "noxfile.py")


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The README demo: the quick grid on SmolLM2-135M, ending in a leaderboard."""
    session.install("-e", ".")
    session.run("bench", "run", "--grid", "configs/quick.yaml", *session.posargs)
