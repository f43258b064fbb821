"""A setting the server or the CLI cannot run with stops it with one line naming the setting, its value
(passwords hidden) and what to do, and a non-zero exit: never a traceback. Through real processes: uvicorn with
`make run`'s --http and without, under --workers 2, and every cli.py command."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli, server_env
from servers import free_port

UVICORN_START_FAILURE = 3
EXIT_BAD_SETTING, EXIT_DATABASE_UNAVAILABLE = 2, 3  # cli.py's
PASSWORD = "hunter2"

# Found as main.py is imported (Settings): the whole output is the one line.
AT_IMPORT = {
    "MAX_QUEUE not a number": ({"MAX_QUEUE": "abc"}, "MAX_QUEUE=abc is not valid (input should be a valid integer"),
    "MAX_QUEUE below MAX_IMAGES_PER_REQUEST": ({"MAX_QUEUE": "4"},
                                               "MAX_QUEUE=4 is below MAX_IMAGES_PER_REQUEST=16: the largest request "
                                               "would never fit; raise MAX_QUEUE or lower MAX_IMAGES_PER_REQUEST"),
    "PARALLEL_BATCHES neither 1 nor INFERENCE_THREADS": ({"PARALLEL_BATCHES": "2", "INFERENCE_THREADS": "4"},
                                                         "PARALLEL_BATCHES=2 is neither 1 nor INFERENCE_THREADS=4: "
                                                         "passes side by side run on one thread each; make it 1 "
                                                         "(one pass at a time, on every thread) or 4"),
    "DATABASE_URL of another database": ({"DATABASE_URL": f"mysql://app:{PASSWORD}@db/classify"},
                                         "DATABASE_URL=mysql://app:***@db/classify is not valid: DATABASE_URL must be"),
    # It crashed start-up with a traceback (a pool setting SQLite's in-memory engine refuses).
    "DATABASE_URL in memory": ({"DATABASE_URL": "sqlite:///:memory:"},
                               "DATABASE_URL=sqlite:///:memory: is not valid: an in-memory SQLite database lasts as "
                               "long as its connection"),
    # It was pydantic's "model_mean.2: Field required".
    "MODEL_MEAN of two numbers": ({"MODEL_MEAN": "0.5,0.5"},
                                  "MODEL_MEAN=0.5,0.5 is not valid: MODEL_MEAN must be three numbers, one per channel "
                                  "(red, green, blue), comma-separated, e.g. 0.485,0.456,0.406"),
    # Model settings that would not change what is served (they were accepted and ignored).
    "MODEL_OUTPUT for MODEL_NAME": ({"MODEL_OUTPUT": "probabilities"},
                                    "MODEL_OUTPUT=probabilities would be ignored: it describes MODEL_ONNX's output"),
    "MODEL_NAME beside MODEL_ONNX": ({"MODEL_ONNX": "flowers.onnx"},
                                     "MODEL_NAME=efficientnet_lite0 would be ignored: with MODEL_ONNX the file is the "
                                     "model (MODEL_ID names it in answers); unset MODEL_NAME"),
    "MODEL_FALLBACK for efficientnet_lite0": ({"MODEL_FALLBACK": "false"},
                                              "MODEL_FALLBACK=false would be ignored: the fallback replaces only "
                                              "torchvision's weights"),
    "INT8_CALIBRATION_DIR for fp32": ({"INT8_CALIBRATION_DIR": "photos"},
                                      "INT8_CALIBRATION_DIR=photos would be ignored: only int8 is calibrated"),
    "int8 on torch": ({"INFERENCE_PRECISION": "int8", "INFERENCE_BACKEND": "torch"},
                      "INFERENCE_PRECISION=int8 cannot be served by INFERENCE_BACKEND=torch"),
}


def in_lifespan(tmp: Path) -> dict[str, tuple[dict[str, str], str]]:
    """Found as the server starts (migrating, loading the model): uvicorn's own lines around the one line."""
    nobody_listens = f"127.0.0.1:{free_port()}"
    return {
        "MODEL_WEIGHTS missing": ({"MODEL_NAME": "resnet18", "MODEL_WEIGHTS": str(tmp / "none.pth")},
                                  f"MODEL_WEIGHTS={tmp / 'none.pth'}: no such file; set it to a weights file"),
        "MODEL_WEIGHTS a folder": ({"MODEL_NAME": "resnet18", "MODEL_WEIGHTS": str(tmp)},
                                   f"MODEL_WEIGHTS={tmp}: a folder, not a file"),
        # It was ignored for efficientnet_lite0: the server started, serving ImageNet.
        "MODEL_WEIGHTS missing for efficientnet_lite0": ({"MODEL_NAME": "efficientnet_lite0",
                                                          "MODEL_WEIGHTS": str(tmp / "none.pth")},
                                                         f"MODEL_WEIGHTS={tmp / 'none.pth'}: no such file"),
        # A folder was said to be missing.
        "MODEL_ONNX a folder": ({"MODEL_NAME": "", "MODEL_ONNX": str(tmp)}, f"MODEL_ONNX={tmp}: a folder, not a file"),
        "MODEL_LABELS a folder": ({"MODEL_LABELS": str(tmp)}, f"MODEL_LABELS={tmp}: a folder, not a file"),
        "INT8_CALIBRATION_DIR without images": ({"INFERENCE_PRECISION": "int8", "INT8_CALIBRATION_DIR": str(tmp)},
                                                f"INT8_CALIBRATION_DIR={tmp} holds no images"),
        "DATABASE_URL in no folder": ({"DATABASE_URL": f"sqlite:///{tmp}/no/such/folder/classify.db"},
                                      f"the folder {tmp}/no/such/folder does not exist; create it"),
        "DATABASE_URL where no PostgreSQL listens": (
            {"DATABASE_URL": f"postgresql+psycopg://app:{PASSWORD}@{nobody_listens}/classify", "DB_TIMEOUT_S": "2"},
            f"DATABASE_URL=postgresql+psycopg://app:***@{nobody_listens}/classify: the database is busy or "
            f"unreachable (connection failed: connection to server at \"127.0.0.1\", port "
            f"{nobody_listens.split(':')[1]} failed: Connection refused); check that PostgreSQL runs at "
            f"{nobody_listens}"),
    }


def uvicorn(tmp: Path, env: dict[str, str], *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uvicorn", "main:app", "--port", str(free_port()), *options],
                          cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, **server_env(tmp), "LOG_LEVEL": "INFO", **env})


def assert_said_in_one_line(done: subprocess.CompletedProcess, expected: str) -> str:
    """The line that names the setting, once; no traceback; no password."""
    output = done.stdout + done.stderr
    assert "Traceback" not in output and PASSWORD not in output and "PydanticUndefined" not in output, output
    said = [line for line in output.splitlines() if "cannot start: " in line]
    assert len(said) == 1 and expected in said[0], output
    return said[0]


# make run's plain uvicorn, and the protocol named by hand as earlier releases' README did
HTTP_OPTIONS = {"plain uvicorn": (), "--http edge.protocol:HttpProtocol": ("--http", "edge.protocol:HttpProtocol")}


@pytest.mark.parametrize("protocol", HTTP_OPTIONS)
@pytest.mark.parametrize("case", AT_IMPORT)
def test_a_setting_found_invalid_at_import_is_one_line_and_exit_3(tmp_path, case, protocol):
    env, expected = AT_IMPORT[case]
    done = uvicorn(tmp_path, env, *HTTP_OPTIONS[protocol])
    assert done.returncode == UVICORN_START_FAILURE, done.stderr
    line = assert_said_in_one_line(done, expected)
    assert (done.stdout + done.stderr).strip() == line  # nothing else at all


@pytest.mark.parametrize("protocol", HTTP_OPTIONS)
@pytest.mark.parametrize("case", ["MODEL_WEIGHTS missing", "MODEL_WEIGHTS a folder",
                                  "MODEL_WEIGHTS missing for efficientnet_lite0", "MODEL_ONNX a folder",
                                  "MODEL_LABELS a folder", "INT8_CALIBRATION_DIR without images",
                                  "DATABASE_URL in no folder", "DATABASE_URL where no PostgreSQL listens"])
def test_a_setting_found_unusable_at_start_up_is_one_line_and_exit_3(tmp_path, case, protocol):
    env, expected = in_lifespan(tmp_path)[case]
    done = uvicorn(tmp_path, env, *HTTP_OPTIONS[protocol])
    assert done.returncode == UVICORN_START_FAILURE, done.stderr
    line = assert_said_in_one_line(done, expected)
    assert " CRITICAL classify " in line
    # Besides it, only uvicorn's progress and its closing line: no traceback of where it was noticed.
    others = [text for text in done.stderr.splitlines() if text != line and " INFO " not in text]
    assert [text.split(": ", 1)[-1] for text in others] == ["Application startup failed. Exiting."], done.stderr


@pytest.mark.parametrize("where", ["at import", "at start-up"])
def test_under_workers_2_the_supervisor_stops_instead_of_restarting_workers(tmp_path, where):
    env = {"MAX_QUEUE": "abc"} if where == "at import" else in_lifespan(tmp_path)["DATABASE_URL in no folder"][0]
    started = time.monotonic()
    done = uvicorn(tmp_path, env, "--workers", "2")
    output = done.stdout + done.stderr
    said = [line for line in output.splitlines() if "cannot start: " in line]
    assert 1 <= len(said) <= 2 and "Traceback" not in output, output  # one per worker at most: none restarted
    assert "failed to start, stopping the parent process" in output
    assert time.monotonic() - started < 120


CLI_COMMANDS = [["migrate"], ["init"], ["create-key", "--email", "ada@example.com"], ["list-keys"],
                ["set-limit", "sk-Qm3xTz8b", "--rate-limit", "5"], ["rotate-key", "sk-Qm3xTz8b"],
                ["revoke-key", "sk-Qm3xTz8b"]]


@pytest.mark.parametrize("command", CLI_COMMANDS, ids=lambda command: command[0])
def test_every_cli_command_says_an_invalid_setting_in_one_line(tmp_path, command):
    done = run_cli(f"sqlite:///{tmp_path / 'classify.db'}", *command, MAX_QUEUE="abc")
    assert done.returncode == EXIT_BAD_SETTING and not done.stdout, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith("MAX_QUEUE=abc is not valid")
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_the_cli_names_a_database_url_it_cannot_open_with_its_password_hidden(tmp_path):
    nowhere = f"sqlite:///{tmp_path}/no/such/folder/classify.db"
    done = run_cli(nowhere, "init")
    assert done.returncode == EXIT_DATABASE_UNAVAILABLE and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"DATABASE_URL={nowhere} cannot be opened: the folder {tmp_path}/no/such/folder "
                                  "does not exist")
    address = f"127.0.0.1:{free_port()}"
    done = run_cli(f"postgresql+psycopg://app:{PASSWORD}@{address}/classify", "list-keys", DB_TIMEOUT_S="2")
    assert done.returncode == EXIT_DATABASE_UNAVAILABLE and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"DATABASE_URL=postgresql+psycopg://app:***@{address}/classify: the database is "
                                  "busy or unreachable (connection failed") and PASSWORD not in done.stderr
    assert f"check that PostgreSQL runs at {address}" in done.stderr and "Traceback" not in done.stderr


def test_a_setting_others_default_from_is_the_only_one_named(tmp_path):
    """INFERENCE_THREADS defaults from WEB_CONCURRENCY: when that is not valid, the line names it alone (it said
    `INFERENCE_THREADS=PydanticUndefined is not valid` too)."""
    done = run_cli(f"sqlite:///{tmp_path / 'classify.db'}", "migrate", WEB_CONCURRENCY="two")
    assert done.returncode == EXIT_BAD_SETTING and not done.stdout, done.stderr
    assert done.stderr.strip() == ("WEB_CONCURRENCY=two is not valid (input should be a valid integer, unable to parse "
                                   "string as an integer): set WEB_CONCURRENCY to what docs/settings.md says it "
                                   "takes, or unset it for the default")
