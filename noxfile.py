"""Sessions behind the README's commands: ``nox -s tests``, ``lint``, ``demo``, ``bench``.

Every session installs under ``constraints/ci.txt`` (the exact torch CI runs; pyproject.toml gives lower
bounds only), so ``nox -s tests`` reproduces ``pip install -c constraints/ci.txt -e '.[test]'``."""

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
CONSTRAINTS = ("-c", "constraints/ci.txt")


def install(session: nox.Session, *args: str) -> None:
    """``pip install -c constraints/ci.txt ARGS`` in the session's environment."""
    session.install(*CONSTRAINTS, *args)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Install blockbench with its test extras and run the whole suite (real SmolLM2 included)."""
    install(session, "-e", ".[test]")
    session.run("pytest", "-q", "-p", "no:cacheprovider", "--durations=15", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    install(session, "ruff>=0.5")
    session.run("ruff", "check", "bench", "algorithms", "estimators", "tests", "noxfile.py")


@nox.session(python=PYTHON)
def gate(session: nox.Session) -> None:
    """The CI regression gate (.ci/gate): run configs/ci.yaml on SmolLM2 and compare with
    results/baselines/ci.json; extra arguments go to ``bench check``. The grid measures accuracy: the
    ``accuracy`` extra."""
    install(session, "-e", ".[accuracy]")
    session.run("bash", ".ci/gate", *session.posargs, external=True)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The README demo: the quick grid on SmolLM2-135M, ending in a leaderboard."""
    install(session, "-e", ".")
    session.run("bench", "run", "--grid", "configs/quick.yaml", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Speed benchmarks (tests/perf, pytest-benchmark): every metric at realistic sizes, our KSG and
    Gaussian MI against reference implementations, scoring vs the calibration forward pass. Results are
    saved as JSON under results/bench/ (compare runs with ``pytest-benchmark compare``)."""
    install(session, "-e", ".[test,perf]")
    session.run(
        "pytest", "tests/perf", "-q", "-p", "no:cacheprovider", "--benchmark-only",
        "--benchmark-storage=file://results/bench", "--benchmark-autosave", "--benchmark-columns=min,median,max,rounds",
        *session.posargs, env={"BLOCKBENCH_PERF": "1"},
    )


@nox.session(python=PYTHON)
def gpu(session: nox.Session) -> None:
    """The GPU check (.ci/gpu), on a machine with a CUDA device: every test marked ``cuda`` and
    configs/gpu.yaml on CUDA with synchronised scoring times. The constraints pin torch's version; pip
    takes the CUDA build of it from the index a GPU machine uses."""
    install(session, "-e", ".[test]")
    session.run("bash", ".ci/gpu", *session.posargs, external=True)
