"""Bad command-line input of every command: exit code 2, one `error:` line, the last on stderr, no
traceback, nothing written. Each case is a row (or part of a row) of the README's troubleshooting table.

Argument checks run before any model, data, MLflow store or Ray session is touched, so these run
in-process in well under a second each; the few that need the model's own limits use an untrained
registered U-Net (T = 50, 10 classes).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
from tests.reliability.helpers import error_lines, listing, register_untrained_ddpm, run_pipeline

M = "models:/ldm@champion"

#: (argv, the start of the one error line); {tmp} is an empty folder outside the working directory,
#: {file} a file in it
CASES: list[tuple[list[str], str]] = [
    # sample
    (["sample", M, "--steps", "0"], "error: pipeline sample: argument --steps: must be an integer ≥ 1, got '0'"),
    (["sample", M, "--steps", "ten"], "error: pipeline sample: argument --steps: must be an integer ≥ 1, got 'ten'"),
    (["sample", M, "--num", "0"], "error: pipeline sample: argument --num: must be an integer ≥ 1, got '0'"),
    (["sample", M, "--nrow", "0"], "error: pipeline sample: argument --nrow: must be an integer ≥ 1, got '0'"),
    (["sample", M, "--guidance", "-1"], "error: pipeline sample: argument --guidance: must be a number ≥ 0, got '-1'"),
    (["sample", M, "--guidance", "nan"],
     "error: pipeline sample: argument --guidance: must be a number ≥ 0, got 'nan'"),
    (["sample", M, "--eta", "1.5"], "error: pipeline sample: argument --eta: must be a number in [0, 1], got '1.5'"),
    (["sample", M, "--label", "-1"], "error: pipeline sample: argument --label: must be an integer ≥ 0, got '-1'"),
    (["sample", M, "--classifier-scale", "-2"],
     "error: pipeline sample: argument --classifier-scale: must be a number ≥ 0, got '-2'"),
    (["sample", M, "--seed", "-1"],
     "error: pipeline sample: argument --seed: must be an integer in [0, 4294967295], got '-1'"),
    (["sample", M, "--sampler", "euler"], "error: pipeline sample: argument --sampler: invalid choice: 'euler'"),
    (["sample", M, "--out", "{tmp}/missing/grid.png"],
     "error: pipeline sample: argument --out: the folder '{tmp}/missing' of '{tmp}/missing/grid.png' does not "
     "exist; create it first (mkdir -p {tmp}/missing)"),
    (["sample", M, "--out", "{tmp}"], "error: pipeline sample: argument --out: '{tmp}' is a folder; give a file name"),
    (["sample", "ldm"], "error: pipeline sample: argument model: 'ldm' is not a model URI; expected "
                        "models:/NAME@ALIAS or models:/NAME/VERSION"),
    (["sample", M, "--classifier", "clf"], "error: pipeline sample: argument --classifier: 'clf' is not a model URI"),
    # data build
    (["data", "build", "--source", "mnist", "--out", "{tmp}/d"],
     "error: pipeline data build: argument --source: unknown data source 'mnist'; valid sources: digits, photos, "
     "sprites, moving-digits, imagefolder:PATH"),
    (["data", "build", "--source", "imagefolder:{tmp}/pics", "--out", "{tmp}/d"],
     "error: pipeline data build: argument --source: image folder '{tmp}/pics' does not exist"),
    (["data", "build", "--source", "digits", "--out", "{tmp}/a/b"],
     "error: pipeline data build: argument --out: the folder '{tmp}/a' of '{tmp}/a/b' does not exist"),
    (["data", "build", "--source", "digits", "--out", "{file}"],
     "error: pipeline data build: argument --out: '{file}' is a file; give a folder"),
    (["data", "build", "--source", "digits", "--out", "{tmp}/d", "--image-size", "0"],
     "error: pipeline data build: argument --image-size: must be an integer ≥ 1, got '0'"),
    (["data", "build", "--source", "digits", "--out", "{tmp}/d", "--held-out", "0"],
     "error: pipeline data build: argument --held-out: must be a number in (0, 1), got '0'"),
    (["data", "build", "--source", "digits", "--out", "{tmp}/d", "--held-out", "1"],
     "error: pipeline data build: argument --held-out: must be a number in (0, 1), got '1'"),
    (["data", "build", "--source", "digits", "--out", "{tmp}/d", "--shard-size", "0"],
     "error: pipeline data build: argument --shard-size: must be an integer ≥ 1, got '0'"),
    (["data", "build", "--out", "{tmp}/d"], "error: pipeline data build: the following arguments are required: "
                                            "--source"),
    # eval, eval nll
    (["eval", M, "--data", "{tmp}/nodata"], "error: pipeline eval: argument --data: no dataset folder "
                                            "'{tmp}/nodata'; build it with `pipeline data build --out {tmp}/nodata`"),
    (["eval", M, "--num", "1"], "error: pipeline eval: argument --num: must be an integer ≥ 2, got '1'"),
    (["eval", "fid", M, "--steps", "0"], "error: pipeline eval: argument --steps: must be an integer ≥ 1, got '0'"),
    (["eval", M, "--classifier", "ldm-classifier"], "error: pipeline eval: argument --classifier: 'ldm-classifier' "
                                                    "is not a model URI"),
    (["eval", M, "--guidance", "-0.5"], "error: pipeline eval: argument --guidance: must be a number ≥ 0, got '-0.5'"),
    (["eval", M, "--sampler", "euler"], "error: pipeline eval: argument --sampler: invalid choice: 'euler'"),
    (["eval", "nll", M, "--data", "{file}"], "error: pipeline eval-nll: argument --data: no dataset folder '{file}'"),
    (["eval", "nll", M, "--split", "val"], "error: pipeline eval-nll: argument --split: invalid choice: 'val'"),
    (["eval", "nll", M, "--num", "0"], "error: pipeline eval-nll: argument --num: must be an integer ≥ 1, got '0'"),
    (["eval", "nll", M, "--batch-size", "0"],
     "error: pipeline eval-nll: argument --batch-size: must be an integer ≥ 1, got '0'"),
    (["eval", "nll", M, "--var-type", "fixed"], "error: pipeline eval-nll: argument --var-type: invalid choice: "
                                                "'fixed'"),
    # toy swissroll
    (["toy", "swissroll", "--steps", "0"],
     "error: pipeline toy swissroll: argument --steps: must be an integer ≥ 1, got '0'"),
    (["toy", "swissroll", "--timesteps", "1"],
     "error: pipeline toy swissroll: argument --timesteps: must be an integer ≥ 2, got '1'"),
    (["toy", "swissroll", "--lr", "0"], "error: pipeline toy swissroll: argument --lr: must be a number > 0, got '0'"),
    (["toy", "swissroll", "--eta", "-0.1"],
     "error: pipeline toy swissroll: argument --eta: must be a number in [0, 1], got '-0.1'"),
    (["toy", "swissroll", "--timesteps", "10", "--sample-steps", "20"],
     "error: --sample-steps 20: must be at most --timesteps (10)"),
    (["toy", "swissroll", "--num-samples", "1"],
     "error: pipeline toy swissroll: argument --num-samples: must be an integer ≥ 2, got '1'"),
    (["toy", "swissroll", "--schedule", "quadratic"],
     "error: pipeline toy swissroll: argument --schedule: invalid choice: 'quadratic'"),
    (["toy", "swissroll", "--parameterization", "score"],
     "error: pipeline toy swissroll: argument --parameterization: invalid choice: 'score'"),
    (["toy", "swissroll", "--loss", "vlb"], "error: pipeline toy swissroll: argument --loss: invalid choice: 'vlb'"),
    (["toy", "swissroll", "--sampler", "euler"],
     "error: pipeline toy swissroll: argument --sampler: invalid choice: 'euler'"),
    (["toy", "swissroll", "--batch-size", "0"],
     "error: pipeline toy swissroll: argument --batch-size: must be an integer ≥ 1, got '0'"),
    (["toy", "swissroll", "--max-lr", "-0.001"],
     "error: pipeline toy swissroll: argument --max-lr: must be a number > 0, got '-0.001'"),
    (["toy", "swissroll", "--lambda-vlb", "-1"],
     "error: pipeline toy swissroll: argument --lambda-vlb: must be a number ≥ 0, got '-1'"),
    (["toy", "swissroll", "--sample-steps", "0"],
     "error: pipeline toy swissroll: argument --sample-steps: must be an integer ≥ 1, got '0'"),
    (["toy", "swissroll", "--nll-points", "0"],
     "error: pipeline toy swissroll: argument --nll-points: must be an integer ≥ 1, got '0'"),
    (["toy", "swissroll", "--threads", "0"],
     "error: pipeline toy swissroll: argument --threads: must be an integer ≥ 1, got '0'"),
    # submit, promote, lineage, run, validate, tune
    (["submit", "job.yaml", "--address", "127.0.0.1:6379"],
     "error: pipeline submit: argument --address: '127.0.0.1:6379' is not a dashboard URL; expected "
     "http://HOST:8265"),
    (["submit", "job.yaml", "--address", "http://127.0.0.1:8265", "--working-dir", "{tmp}/src"],
     "error: pipeline submit: argument --working-dir: no folder '{tmp}/src'"),
    (["submit", "job.yaml"], "error: pipeline submit: the following arguments are required: --address"),
    (["promote", "models:/ldm@candidate"], "error: pipeline promote: argument name: 'models:/ldm@candidate' is a "
                                           "model URI or not a name; give the registered name alone, e.g. ldm"),
    (["promote", "ldm", "--to", "7"], "error: pipeline promote: argument --to: '7' is not an alias name (letters, "
                                      "digits, _ and -, e.g. champion)"),
    (["promote", "ldm", "--from", "best one"], "error: pipeline promote: argument --from: 'best one' is not an "
                                               "alias name"),
    (["promote", "ldm", "--higher-is-better"],
     "error: --higher-is-better goes with --metric NAME (the stage's own gate knows its direction)"),
    (["lineage", "ldm@champion"], "error: pipeline lineage: argument model: 'ldm@champion' is not a model URI"),
    (["run", "{tmp}/job.yaml"], "error: {tmp}/job.yaml: job file not found"),
    (["validate", "{tmp}/job.yaml"], "error: {tmp}/job.yaml: job file not found"),
    (["tune", "{tmp}/sweep.yaml"], "error: {tmp}/sweep.yaml: sweep file not found"),
    # bench, the command itself
    (["bench"], "error: pipeline bench: the following arguments are required: name"),
    (["bench", "fastest"], "error: pipeline bench: argument name: invalid choice: 'fastest'"),
    (["bench", "data", "--repeats", "0"], "error: pipeline bench: argument --repeats: must be an integer ≥ 1, got '0'"),
    (["bench", "data", "--json", "{tmp}/out/data.json"],
     "error: pipeline bench: argument --json: the folder '{tmp}/out' of '{tmp}/out/data.json' does not exist"),
    ([], "error: pipeline: the following arguments are required: command"),
    (["train"], "error: pipeline: argument command: invalid choice: 'train'"),
]


def exit_of(capsys: pytest.CaptureFixture, argv: list[str]) -> tuple[int, str]:
    """Run `pipeline ARGV` in this process: (exit code, stderr), whether `main` returned or raised."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_error_line(code: int, err: str, expected_start: str) -> str:
    """Exit 2, exactly one `error:` line, the last, starting as expected; no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    errors, last = error_lines(err)
    assert errors == [last], err
    assert last.startswith(expected_start), last
    return last


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(a) or "(none)" for a, _ in CASES])
def test_bad_argument_exits_2_with_one_error_line(cwd: Path, capsys, argv: list[str], expected: str) -> None:
    tmp = cwd.parent / "elsewhere"
    tmp.mkdir()
    (tmp / "a-file").write_text("x")
    fill = {"tmp": str(tmp), "file": str(tmp / "a-file")}
    code, err = exit_of(capsys, [a.format(**fill) for a in argv])
    assert_one_error_line(code, err, expected.format(**fill))
    assert listing(cwd) == set() and listing(tmp) == {"a-file"}  # nothing written, no MLflow store created


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Tracking URI of a store holding models:/tiny-ddpm@champion (untrained, T = 50, 10 classes)."""
    return register_untrained_ddpm(tmp_path_factory.mktemp("bad-cli-store"))


TINY = ["models:/tiny-ddpm@champion", "--tracking-uri", "{store}"]


@pytest.mark.parametrize("argv, expected", [
    (["sample", *TINY, "--steps", "51", "--out", "{cwd}/g.png"],
     "error: --steps 51: must be in [1, 50] (the timesteps T of this model)"),
    (["sample", *TINY, "--steps", "51", "--sampler", "ancestral", "--out", "{cwd}/g.png"],
     "error: --steps 51: must be in [1, 50] (the timesteps T of this model)"),
    (["sample", *TINY, "--label", "10", "--out", "{cwd}/g.png"], "error: --label must be in [0, 9]"),
    (["sample", *TINY, "--control", "{cwd}/edges.png"], "error: --control needs a ControlNet model"),
    (["sample", *TINY, "--classifier-scale", "3"], "error: --classifier-scale needs --classifier models:/NAME@ALIAS"),
    (["sample", *TINY, "--caption", "a three"], "error: --caption needs a text-conditioned model (unCLIP decoder, "
                                                "conditioning: text); this model takes --label"),
    (["eval", *TINY, "--steps", "60", "--data", "{cwd}"],
     "error: --steps 60: must be in [1, 50] (the timesteps T of this model)"),
])
def test_bad_argument_for_this_model(cwd: Path, capsys, store: str, argv: list[str], expected: str) -> None:
    """Limits only the model knows (its T, its classes): checked when it is loaded, before sampling."""
    code, err = exit_of(capsys, [a.format(cwd=cwd, store=store) for a in argv])
    assert_one_error_line(code, err, expected)
    assert err.splitlines()[-1] == expected
    assert listing(cwd) == set()  # no grid written


def test_issue_cases_exit_2_from_the_real_command(tmp_path: Path, store: str) -> None:
    """The issue's report, as a user runs it: `--steps 0` and `--label 12` end in exit code 2 and one line
    (`--label 12` used to exit 1 through a bare SystemExit message)."""
    for args, expected in ((["--steps", "0"], "error: pipeline sample: argument --steps: must be an integer ≥ 1, "
                                              "got '0'"),
                           (["--label", "12"], "error: --label must be in [0, 9]")):
        out = run_pipeline(tmp_path, "sample", "models:/tiny-ddpm@champion", *args, "--tracking-uri", store,
                           "--out", "g.png", timeout=300)
        assert out.returncode == 2, out.stderr[-2000:]
        errors, last = error_lines(out.stderr)
        assert errors == [last] == [expected], out.stderr[-2000:]
        assert "Traceback" not in out.stderr
        assert not (tmp_path / "g.png").exists()


def test_submit_to_an_unreachable_job_api(cwd: Path, capsys, digits8: Path) -> None:
    """A valid job sent to a dashboard address where nothing listens: one line, not requests' traceback."""
    import socket

    from tests.reliability.helpers import write_job

    job = write_job(cwd.parent / "job.yaml", digits8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, err = exit_of(capsys, ["submit", str(job), "--address", f"http://127.0.0.1:{port}"])
    last = assert_one_error_line(code, err, f"error: cannot reach the Ray job API at http://127.0.0.1:{port} (")
    assert last.endswith("); start the cluster's head (`ray start --head`) or fix --address")
    assert listing(cwd) == set()


def test_ray_data_retry_note_is_not_part_of_the_error_line() -> None:
    """Ray Data appends a retry note to an exception raised in its map tasks (as seen from a real task:
    test_bad_input_ray.py); the printed line keeps the user's message only, other multi-line messages whole."""
    from pipeline.config import user_message
    from pipeline.data import DataError

    noted = ("corrupt member 0003.png: broken\nFailed to apply UDF transform after 1/1 attempts (total backoff "
             "0.0s).\nTo change retry attempts, backoff, or which errors are retried, configure …")
    assert user_message(DataError(noted)) == "corrupt member 0003.png: broken"
    spec = "job.yaml: invalid job spec (1 problem(s)):\n  stages.x.train.stepz: unknown key"
    assert user_message(DataError(spec)) == spec
