"""dreamprm.cli: user errors become one clean message, bugs keep their traceback."""

import pytest

from dreamprm import cli, errors


@pytest.mark.parametrize("err", [errors.DataError(["a.jsonl:3: steps: empty step"]), errors.CheckpointError("torn"),
                                 errors.RunLockError("held"), errors.NonFiniteError("nan"), errors.ModelError("tag"),
                                 errors.ScoringError("x")])
def test_user_errors_print_one_message(monkeypatch, capsys, err):
    import dreamprm.train

    def fit(cfg, notes):
        raise err

    monkeypatch.setattr(dreamprm.train, "fit", fit)
    assert cli.train(["--total_steps", "1"]) == 1
    out = capsys.readouterr().err
    assert out.startswith("error: ") and str(err) in out and "Traceback" not in out


@pytest.mark.parametrize("bug", [ImportError("no module named x"), FileNotFoundError("/tmp/nope")])
def test_bugs_keep_their_traceback(monkeypatch, bug):
    import dreamprm.train

    def fit(cfg, notes):
        raise bug

    monkeypatch.setattr(dreamprm.train, "fit", fit)
    with pytest.raises(type(bug)):
        cli.train(["--total_steps", "1"])


def test_config_errors_exit_2_naming_every_flag(capsys):
    assert cli.train(["--lr", "-1", "--batch_size", "0"]) == 2
    err = capsys.readouterr().err
    assert "--lr: must be > 0" in err and "--batch_size: must be >= 1" in err


def test_config_errors_print_once_per_machine_under_a_launcher(capsys, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cli.train(["--lr", "-1"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert cli.train(["--lr", "-1"]) == 2
    assert capsys.readouterr().err.count("--lr: must be > 0") == 1


def test_dreamprm_argument_errors_are_one_line_and_take_no_abbreviations(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    f = tmp_path / "d.jsonl"
    f.write_text("")
    for argv, what in ((["data", "check", str(f), "--fro", "trl"], "unrecognized arguments: --fro trl"),
                       (["data", "check", str(f), "--from", "nope"], "argument --from: invalid choice: 'nope'"),
                       (["evaluate", "steps", "--data", str(f), "--scores", str(f), "--n-bins", "x"],
                        "argument --n-bins: invalid int value: 'x'"),
                       (["nosuch"], "invalid choice: 'nosuch'")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and what in err and "--help`)" in err, err
