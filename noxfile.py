"""Sessions behind the README's commands: ``nox -s tests``, ``lint``, ``demo``, ``bench``."""

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Install blockbench with its test extras and run the whole suite (real SmolLM2 included)."""
    session.install("-e", ".[test]")
    session.run("pytest", "-q", "-p", "no:cacheprovider", "--durations=15", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.5")
    session.run("ruff", "check", "bench", "algorithms", "estimators", "tests", "noxfile.py")


@nox.session(python=PYTHON)
def gate(session: nox.Session) -> None:
    """The CI regression gate (.ci/gate): run configs/ci.yaml on SmolLM2 and compare with
    results/baselines/ci.json; extra arguments go to ``bench check``."""
    session.install("-e", ".")
    session.run("bash", ".ci/gate", *session.posargs, external=True)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The README demo: the quick grid on SmolLM2-135M, ending in a leaderboard."""
    session.install("-e", ".")
    session.run("bench", "run", "--grid", "configs/quick.yaml", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Speed benchmarks (tests/perf, pytest-benchmark): every metric at realistic sizes, our KSG and
    Gaussian MI against reference implementations, scoring vs the calibration forward pass. Results are
    saved as JSON under results/bench/ (compare runs with ``pytest-benchmark compare``)."""
    session.install("-e", ".[test,perf]")
    session.run(
        "pytest", "tests/perf", "-q", "-p", "no:cacheprovider", "--benchmark-only",
        "--benchmark-storage=file://results/bench", "--benchmark-autosave", "--benchmark-columns=min,median,max,rounds",
        *session.posargs, env={"BLOCKBENCH_PERF": "1"},
    )
