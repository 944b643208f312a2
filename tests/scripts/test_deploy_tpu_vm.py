"""scripts/deploy_tpu_vm.sh: argument handling and the commands it prints with --dry-run.

The script runs with a PATH that holds every tool of the test's PATH except `gcloud`, so no
test can reach Google Cloud (a dry run must not need gcloud; a real run must refuse without it).
The remote commands it prints are also executed here, against a scratch $HOME with a stub
`tuft`, to check that quoting survives both shells (local, then the VM's).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "deploy_tpu_vm.sh"
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]

Run = Callable[..., subprocess.CompletedProcess]


@pytest.fixture(scope="module")
def path_without_gcloud(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A one-directory PATH linking every executable on PATH except gcloud."""
    bin_dir = tmp_path_factory.mktemp("bin-no-gcloud")
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not directory or not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            if entry.name == "gcloud" or (bin_dir / entry.name).exists():
                continue
            if os.path.isfile(entry.path) and os.access(entry.path, os.X_OK):
                (bin_dir / entry.name).symlink_to(entry.path)
    assert shutil.which("bash", path=str(bin_dir)), "bash is needed to run the script"
    assert shutil.which("gcloud", path=str(bin_dir)) is None
    return str(bin_dir)


@pytest.fixture
def run(path_without_gcloud: str, tmp_path: Path) -> Run:
    def run_script(*args: str, extra_path: Path | None = None, **extra_env: str) -> subprocess.CompletedProcess:
        env = {
            "PATH": path_without_gcloud if extra_path is None else f"{extra_path}{os.pathsep}{path_without_gcloud}",
            "HOME": str(tmp_path / "local-home"),
            "TMPDIR": str(tmp_path),
            "LC_ALL": "C",
            **extra_env,
        }
        return subprocess.run(
            [str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
        )

    return run_script


@pytest.fixture
def model_config(tmp_path: Path) -> Path:
    path = tmp_path / "my models.yaml"
    path.write_text("models:\n  - name: m\n    path: /models/m\n")
    return path


def commands(stdout: str) -> list[list[str]]:
    """The dry run's commands: every non-comment line, split the way a POSIX shell would."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


def tpu_commands(cmds: list[list[str]], verb: str) -> list[list[str]]:
    return [c for c in cmds if c[:4] == TPU and c[4] == verb]


def option(argv: list[str], name: str) -> str | None:
    """Value of `--name=value` or `--name value` in argv (None when absent)."""
    for index, word in enumerate(argv):
        if word.startswith(name + "="):
            return word[len(name) + 1 :]
        if word == name and index + 1 < len(argv):
            return argv[index + 1]
    return None


def remote_words(remote: str) -> list[str]:
    lexer = shlex.shlex(remote, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def tuft_argv(remote: str) -> list[str]:
    """The arguments after the tuft executable in a start command (up to the redirection)."""
    words = remote_words(remote)
    start = next(i for i, w in enumerate(words) if w.endswith("/venv/bin/tuft"))
    end = words.index(">", start)
    return words[start + 1 : end]


def start_commands(cmds: list[list[str]]) -> dict[int, str]:
    """worker index -> remote command, for the ssh commands that start tuft."""
    starts: dict[int, str] = {}
    for argv in tpu_commands(cmds, "ssh"):
        remote = option(argv, "--command")
        if remote is not None and "nohup" in remote:
            worker = int(option(argv, "--worker"))  # type: ignore[arg-type]
            assert worker not in starts, f"two start commands for worker {worker}"
            starts[worker] = remote
    return starts


SINGLE = ["--name", "tuft-single", "--zone", "us-west4-a", "--accelerator-type", "v5litepod-8"]
MULTI = ["--name", "tuft-multi", "--zone", "us-central2-b", "--accelerator-type", "v4-32"]


def test_help_exits_zero(run: Run) -> None:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage:")
    for flag in ("--name", "--zone", "--accelerator-type", "--version", "--project", "--spot", "--source-dir",
                 "--repo-url", "--model-config", "--port", "--checkpoint-dir", "--dry-run", "--tunnel"):
        assert flag in result.stdout
    assert run("-h").returncode == 0


def test_single_host_dry_run(run: Run, model_config: Path) -> None:
    result = run(*SINGLE, "--model-config", str(model_config), "--dry-run")
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)

    (create,) = tpu_commands(cmds, "create")
    assert create[5] == "tuft-single"
    assert option(create, "--accelerator-type") == "v5litepod-8"
    assert option(create, "--zone") == "us-west4-a"
    assert option(create, "--version") == "v2-alpha-tpuv5-lite"
    assert "--spot" not in create and option(create, "--project") is None

    # Source: `git archive HEAD` of this checkout, scp'ed (with the model config) to every worker.
    (archive,) = [c for c in cmds if c[0] == "git"]
    assert archive[:3] == ["git", "-C", str(REPO_ROOT)] and "archive" in archive and archive[-1] == "HEAD"
    tarball = option(archive, "-o")
    scps = tpu_commands(cmds, "scp")
    assert [c[5] for c in scps] == [tarball, str(model_config)]
    assert all(option(c, "--worker") == "all" and option(c, "--zone") == "us-west4-a" for c in scps)
    assert all(c[6].startswith("tuft-single:") for c in scps)

    ssh = tpu_commands(cmds, "ssh")
    all_workers = [option(c, "--command") for c in ssh if option(c, "--worker") == "all"]
    (install,) = [r for r in all_workers if r and "pip install" in r]
    assert "-m venv venv" in install
    assert re.search(r'pip install "jax\[tpu\]" -e \./src', install)

    starts = start_commands(cmds)
    assert list(starts) == [0]
    argv = tuft_argv(starts[0])
    assert option(argv, "--host") == "0.0.0.0" and option(argv, "--port") == "8080"
    assert option(argv, "--checkpoint-dir") == "$HOME/tuft/checkpoints"
    assert option(argv, "--model-config") == "$HOME/tuft/models.yaml"
    for multi_host_flag in ("--coordinator-address", "--num-processes", "--process-id"):
        assert multi_host_flag not in argv
    assert "nohup" in starts[0] and "> logs/tuft-0.log 2>&1" in starts[0]

    describes = tpu_commands(cmds, "describe")
    assert [option(c, "--format") for c in describes] == ["value(networkEndpoints[0].accessConfig.externalIp)"]
    assert "URL: http://<worker0-external-ip>:8080" in result.stdout
    assert "firewall-rules create" in result.stdout and "tcp:8080" in result.stdout
    assert "-N -L 8080:localhost:8080" in result.stdout

    # Order: create, copy, install, start, then the URL query.
    order = [c[4] if c[:4] == TPU else c[0] for c in cmds]
    assert order == ["create", "git", "scp", "scp", "ssh", "ssh", "ssh", "describe"]


def test_multi_host_dry_run(run: Run) -> None:
    result = run(*MULTI, "--project", "my-project-1", "--spot", "--port", "9000", "--dry-run")
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)

    (create,) = tpu_commands(cmds, "create")
    assert option(create, "--accelerator-type") == "v4-32"
    assert option(create, "--zone") == "us-central2-b"
    assert option(create, "--version") == "tpu-ubuntu2204-base"
    assert "--spot" in create
    for argv in (c for c in cmds if c[0] == "gcloud"):
        assert option(argv, "--project") == "my-project-1", argv

    ssh = tpu_commands(cmds, "ssh")
    assert any("pip install" in (option(c, "--command") or "") for c in ssh if option(c, "--worker") == "all")
    assert all(option(c, "--worker") == "all" for c in tpu_commands(cmds, "scp"))

    # Worker 0's internal IP (queried before any start) is the coordinator.
    describes = tpu_commands(cmds, "describe")
    assert option(describes[0], "--format") == "value(networkEndpoints[0].ipAddress)"
    assert cmds.index(describes[0]) < min(cmds.index(c) for c in ssh if "nohup" in (option(c, "--command") or ""))

    starts = start_commands(cmds)
    assert sorted(starts) == [0, 1, 2, 3]
    for worker, remote in starts.items():
        argv = tuft_argv(remote)
        assert option(argv, "--coordinator-address") == "<worker0-internal-ip>:8476"
        assert option(argv, "--num-processes") == "4"
        assert option(argv, "--process-id") == str(worker)
        assert option(argv, "--port") == "9000"
        assert f"logs/tuft-{worker}.log" in remote
    assert "URL: http://<worker0-external-ip>:9000" in result.stdout


@pytest.mark.parametrize(
    ("accelerator", "hosts", "version"),
    [
        ("v4-8", 1, "tpu-ubuntu2204-base"),
        ("v5p-16", 2, "v2-alpha-tpuv5"),
        ("v5litepod-4", 1, "v2-alpha-tpuv5-lite"),
        ("v5litepod-16", 4, "v2-alpha-tpuv5-lite"),
        ("v6e-8", 1, "v2-alpha-tpuv6e"),
        ("v6e-32", 8, "v2-alpha-tpuv6e"),
    ],
)
def test_hosts_and_version_from_accelerator_type(run: Run, accelerator: str, hosts: int, version: str) -> None:
    result = run("--name", "t", "--zone", "us-east5-a", "--accelerator-type", accelerator, "--dry-run")
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    assert option(tpu_commands(cmds, "create")[0], "--version") == version
    starts = start_commands(cmds)
    assert sorted(starts) == list(range(hosts))
    if hosts > 1:
        assert all(option(tuft_argv(r), "--num-processes") == str(hosts) for r in starts.values())


def test_overrides_tunnel_and_repo_url(run: Run) -> None:
    result = run(
        "--name", "t1", "--zone", "us-east5-a", "--accelerator-type", "tpu7x-16", "--num-hosts", "2",
        "--version", "custom-runtime", "--coordinator-port", "9999", "--tunnel", "--skip-create",
        "--repo-url", "https://example.com/tuft.git", "--ref", "v1.0", "--dry-run", "--", "--extra", "a b",
    )
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    assert tpu_commands(cmds, "create") == []
    assert tpu_commands(cmds, "scp") == [] and not any(c[0] == "git" for c in cmds)
    setup = option(tpu_commands(cmds, "ssh")[0], "--command")
    assert "git clone --depth 1 --branch v1.0 -- https://example.com/tuft.git" in setup
    starts = start_commands(cmds)
    assert sorted(starts) == [0, 1]
    argv = tuft_argv(starts[1])
    assert option(argv, "--host") == "127.0.0.1"
    assert option(argv, "--coordinator-address") == "<worker0-internal-ip>:9999"
    assert argv[-2:] == ["--extra", "a b"]
    # --tunnel: no external IP query, an ssh -L forward and a localhost URL instead.
    assert [option(c, "--format") for c in tpu_commands(cmds, "describe")] == ["value(networkEndpoints[0].ipAddress)"]
    assert "--worker=0 -- -N -L 8080:localhost:8080" in result.stdout
    assert "URL: http://localhost:8080" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "Bad_Name", "--zone", "us-west4-a", "--accelerator-type", "v4-8"], "invalid --name"),
        (["--name", "--zone", "us-west4-a", "--accelerator-type", "v4-8"], "--name needs a value"),
        (["--name", "-x", "--zone", "us-west4-a", "--accelerator-type", "v4-8"], "invalid --name"),
        (["--name", "x" * 64, "--zone", "us-west4-a", "--accelerator-type", "v4-8"], "invalid --name"),
        ([*SINGLE, "--port", "70000"], "invalid --port"),
        ([*SINGLE, "--port", "0"], "invalid --port"),
        ([*SINGLE, "--port", "80a"], "invalid --port"),
        ([*SINGLE, "--port"], "--port needs a value"),
        (["--name", "ok", "--zone", "us west", "--accelerator-type", "v4-8"], "invalid --zone"),
        (["--name", "ok", "--zone", "us-west4-a", "--accelerator-type", "v4"], "invalid --accelerator-type"),
        (["--name", "ok", "--zone", "us-west4-a", "--accelerator-type", "v4-12"], "multiples of 8"),
        (["--name", "ok", "--zone", "us-west4-a", "--accelerator-type", "v9-8"], "--num-hosts"),
        (["--zone", "us-west4-a", "--accelerator-type", "v4-8"], "--name is required"),
        (["--name", "ok", "--accelerator-type", "v4-8"], "--zone is required"),
        ([*SINGLE, "--project", "Bad Project"], "invalid --project"),
        ([*SINGLE, "--model-config", "/nonexistent/models.yaml"], "--model-config"),
        ([*SINGLE, "--repo-url", "https://x/y.git", "--source-dir", "."], "mutually exclusive"),
        ([*SINGLE, "--num-hosts", "0"], "invalid --num-hosts"),
        ([*MULTI, "--port", "8476"], "must differ"),
        ([*SINGLE, "--spot=yes"], "takes no value"),
        ([*SINGLE, "--frobnicate"], "unknown argument"),
    ],
)
def test_invalid_arguments(run: Run, args: list[str], message: str) -> None:
    result = run(*args, "--dry-run")
    assert result.returncode != 0
    assert message in result.stderr
    assert "gcloud" not in result.stdout


def test_real_run_without_gcloud_fails_fast(run: Run) -> None:
    started = time.monotonic()
    result = run(*SINGLE)
    assert result.returncode != 0
    assert "gcloud not found" in result.stderr
    assert result.stdout == ""
    assert time.monotonic() - started < 10
    # Argument errors are still reported first.
    assert "invalid --port" in run(*SINGLE, "--port", "99999").stderr


FAKE_GCLOUD = """#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[3] == "scp":  # keep what would have been uploaded (the script deletes its temp dir)
    shutil.copy(args[4], os.path.join(os.environ["FAKE_GCLOUD_LOG"] + ".d", os.path.basename(args[4])))
if args[3] == "describe":
    fmt = [a for a in args if a.startswith("--format=")][0]
    print("34.1.2.3" if "externalIp" in fmt else "10.0.0.2")
"""


def test_real_run_with_a_fake_gcloud(run: Run, tmp_path: Path, model_config: Path) -> None:
    """The non-dry path: same commands, actually executed, with run-time IPs filled in."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    git = ["git", "-C", str(source), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    (source / "uncommitted.txt").write_text("not deployed\n")
    subprocess.run([*git, "add", "uncommitted.txt"], check=True)

    fake_bin = tmp_path / "fake-bin"
    fake_bin.mkdir()
    (fake_bin / "gcloud").write_text(FAKE_GCLOUD.replace("{python}", sys.executable))
    (fake_bin / "gcloud").chmod(0o755)
    log = tmp_path / "gcloud.log"
    (tmp_path / "gcloud.log.d").mkdir()

    result = run(*MULTI, "--source-dir", str(source), "--model-config", str(model_config),
                 extra_path=fake_bin, FAKE_GCLOUD_LOG=str(log))
    assert result.returncode == 0, result.stderr
    assert "uncommitted changes" in result.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[3] for c in calls] == ["create", "scp", "scp", "ssh", "ssh", "describe", "ssh", "ssh", "ssh", "ssh",
                                     "describe"]
    starts = start_commands([["gcloud", *c] for c in calls])
    assert sorted(starts) == [0, 1, 2, 3]
    assert all(option(tuft_argv(r), "--coordinator-address") == "10.0.0.2:8476" for r in starts.values())
    with tarfile.open(tmp_path / "gcloud.log.d" / "tuft-src.tar.gz") as tar:
        assert tar.getnames() == ["pyproject.toml"]  # HEAD only
    assert "URL: http://34.1.2.3:8080" in result.stdout
    assert not any(p.name.startswith("tuft-deploy") for p in tmp_path.iterdir()), "temp dir left behind"


def test_printed_remote_commands_run_and_keep_their_quoting(run: Run, tmp_path: Path, model_config: Path) -> None:
    """Execute the dry run's setup and start commands in a scratch $HOME with a stub tuft."""
    checkpoint_dir = "~/ck it's $HOME \"q\" `x` \\z"
    result = run(
        *MULTI, "--model-config", str(model_config), "--checkpoint-dir", checkpoint_dir,
        "--cache-dir", "/tmp/c d", "--dry-run", "--", "--flag", "it's a $test",
    )
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    home = tmp_path / "vm-home"
    home.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(home)}

    # What `gcloud scp` would have put in $HOME.
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "pyproject.toml").write_text("[project]\nname='x'\n")
    with tarfile.open(home / "tuft-src.tar.gz", "w:gz") as tar:
        tar.add(payload / "pyproject.toml", arcname="pyproject.toml")
    shutil.copy(model_config, home / "tuft-models.yaml")

    setup = option(tpu_commands(cmds, "ssh")[0], "--command")
    subprocess.run(["bash", "-c", setup], env=env, check=True, timeout=30)
    assert (home / "tuft" / "src" / "pyproject.toml").is_file()
    assert (home / "tuft" / "models.yaml").read_text() == model_config.read_text()
    assert not (home / "tuft-src.tar.gz").exists()

    # A stub tuft that records its arguments (NUL-separated) and stays up like a server.
    stub = home / "tuft" / "venv" / "bin" / "tuft"
    stub.parent.mkdir(parents=True)
    stub.write_text('#!/bin/sh\nprintf "%s\\0" "$@" > "$HOME/tuft/args"\nexec sleep 60\n')
    stub.chmod(0o755)

    def start(worker: int) -> tuple[list[str], int]:
        args_file = home / "tuft" / "args"
        args_file.unlink(missing_ok=True)
        subprocess.run(["bash", "-c", start_commands(cmds)[worker]], env=env, check=True, timeout=60)
        deadline = time.monotonic() + 10
        while not (args_file.exists() and args_file.read_bytes().endswith(b"\0")):
            assert time.monotonic() < deadline, "stub tuft did not start"
            time.sleep(0.05)
        return args_file.read_bytes().decode().split("\0")[:-1], int((home / "tuft" / "tuft.pid").read_text())

    argv, first_pid = start(2)
    try:
        expected_checkpoint = str(home) + "/ck it's $HOME \"q\" `x` \\z"
        assert argv == [
            "--host", "0.0.0.0", "--port", "8080",
            "--checkpoint-dir", expected_checkpoint,
            "--model-config", f"{home}/tuft/models.yaml",
            "--cache-dir", "/tmp/c d",
            "--coordinator-address", "<worker0-internal-ip>:8476", "--num-processes", "4", "--process-id", "2",
            "--flag", "it's a $test",
        ]
        assert Path(expected_checkpoint).is_dir()
        assert (home / "tuft" / "logs" / "tuft-2.log").exists()

        # A redeploy stops the server the previous one started (by its recorded pid).
        _, second_pid = start(2)
        assert second_pid != first_pid
        deadline = time.monotonic() + 10
        while _alive(first_pid):
            assert time.monotonic() < deadline, "previous server was not stopped"
            time.sleep(0.05)
        os.kill(second_pid, signal.SIGTERM)
    finally:
        for pid in (first_pid, int((home / "tuft" / "tuft.pid").read_text())):
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of the shell may linger as a zombie until reaped; treat it as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
