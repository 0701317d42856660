"""training/rundir.py: the source commit a run records is read once, from the code the process runs."""

import subprocess

from mathtune.training import rundir


def test_the_source_commit_is_read_once_per_process(monkeypatch):
    rundir.source_commit.cache_clear()
    calls = []
    real_run = subprocess.run

    def counting_run(args, **kwargs):
        calls.append(args[1])
        return real_run(args, **kwargs)

    monkeypatch.setattr(rundir.subprocess, "run", counting_run)
    first = rundir.source_commit()
    assert rundir.source_commit() == first  # a checkout that moves on later is not read again
    assert calls.count("rev-parse") == 1
    commit, changed = first
    if commit is not None:  # a git checkout: the commit is HEAD's, and whether tracked files differ from it
        assert commit == real_run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                  cwd=rundir.Path(rundir.__file__).parent).stdout.strip()
        assert isinstance(changed, bool)
    rundir.source_commit.cache_clear()


def test_outside_a_checkout_the_commit_is_unknown(monkeypatch):
    rundir.source_commit.cache_clear()

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(rundir.subprocess, "run", no_git)
    assert rundir.source_commit() == (None, None)
    rundir.source_commit.cache_clear()
