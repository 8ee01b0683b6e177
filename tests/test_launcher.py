"""The launcher (distributed_core/launcher.py), GPU detection (gpus.py) and the two wrapper scripts."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from distributed_core import config, gpus, launcher, local_instances  # noqa: E402
from comfy_shapes import ANSWERING_SERVER  # noqa: E402

POSIX_ONLY = pytest.mark.skipif(os.name == "nt", reason="uses POSIX shell scripts and signals")

# Stands in for ComfyUI where only the process handling is tested: it answers /system_stats
# and prints its arguments and environment to its log.
FAKE_MAIN = """
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port = int(sys.argv[sys.argv.index("--port") + 1])
listen = sys.argv[sys.argv.index("--listen") + 1]
print("ARGV", json.dumps(sys.argv[1:]), "CUDA", os.environ.get("CUDA_VISIBLE_DEVICES"),
      "CONFIG", os.environ.get("COMFYUI_DISTRIBUTED_CONFIG"), flush=True)
""" + ANSWERING_SERVER


# --- helpers ----------------------------------------------------------------------------------

def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (an orphan may stay one in a container)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(condition, limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting: {what}")
        time.sleep(0.2)


def launcher_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != config.ENV_VAR}
    env.update(extra)
    return env


def run_launcher(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distributed_core.launcher", *args], cwd=cwd,
                          env=env or launcher_env(), capture_output=True, text=True, timeout=120)


def write_config(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def dry_run_blocks(output: str) -> dict[str, dict]:
    """{instance id: {"env": {...}, "argv": [...]}} from --dry-run output."""
    blocks: dict[str, dict] = {}
    current: dict = {}
    for line in output.splitlines():
        header = re.match(r"^([A-Za-z0-9_-]+): (.+), port (\d+)", line)
        if header:
            current = blocks.setdefault(header.group(1), {"port": int(header.group(3))})
        elif line.startswith("  env: "):
            current["env"] = dict(word.split("=", 1) for word in shlex.split(line[len("  env: "):]))
        elif line.startswith("  command: "):
            current["argv"] = shlex.split(line[len("  command: "):])
    return blocks


@pytest.fixture
def comfy_stub(tmp_path: Path) -> Path:
    root = tmp_path / "comfy"
    root.mkdir()
    (root / "main.py").write_text("", encoding="utf-8")
    return root


@pytest.fixture
def fake_comfy(tmp_path: Path) -> Path:
    root = tmp_path / "fake_comfy"
    root.mkdir()
    (root / "main.py").write_text(FAKE_MAIN, encoding="utf-8")
    return root


@pytest.fixture
def launch(tmp_path: Path):
    """Start the launcher in the background; whatever it started is gone after the test, pass or fail."""
    runs: list[tuple[subprocess.Popen, Path]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
        out = tmp_path / f"launcher{len(runs)}.out"
        with out.open("w", encoding="utf-8") as handle:
            process = subprocess.Popen([sys.executable, "-m", "distributed_core.launcher", *args], cwd=REPO,
                                       env=env or launcher_env(), stdout=handle, stderr=subprocess.STDOUT)
        runs.append((process, out))
        return process, out

    yield start
    for process, out in runs:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in started_pids(out.read_text(encoding="utf-8")).values():
            if alive(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def started_pids(output: str) -> dict[str, int]:
    return {name: int(pid) for name, pid in re.findall(r"^Started (\S+) \(pid (\d+)\)", output, re.M)}


def wait_for_output(process: subprocess.Popen, out: Path, text: str, limit_s: float) -> str:
    deadline = time.monotonic() + limit_s
    while True:
        content = out.read_text(encoding="utf-8")
        if text in content:
            return content
        if process.poll() is not None:
            pytest.fail(f"the launcher exited ({process.returncode}) before printing {text!r}:\n{content}")
        if time.monotonic() > deadline:
            pytest.fail(f"the launcher did not print {text!r} within {limit_s} s:\n{content}")
        time.sleep(0.2)


# --- gpus.py ----------------------------------------------------------------------------------

def test_parse_nvidia_smi_tolerates_odd_spacing_and_names_with_commas():
    output = ("  0,   NVIDIA GeForce RTX 4090 ,24564 \n"
              "\n"
              "1,NVIDIA H100 80GB HBM3,   81559\r\n"
              "2, Tesla K80, rev. B, 11441\n")
    assert gpus.parse_nvidia_smi(output) == [
        {"index": 0, "name": "NVIDIA GeForce RTX 4090", "vram_total_mb": 24564},
        {"index": 1, "name": "NVIDIA H100 80GB HBM3", "vram_total_mb": 81559},
        {"index": 2, "name": "Tesla K80, rev. B", "vram_total_mb": 11441},
    ]


@pytest.mark.parametrize("output", ["", "\n\n", "No devices were found\n", "index, name, memory.total [MiB]\n",
                                    "0, Some GPU, [N/A]\n"])
def test_parse_nvidia_smi_without_usable_lines_is_empty(output):
    assert gpus.parse_nvidia_smi(output) == []


def test_config_from_gpus_puts_the_master_on_the_first_gpu_and_a_worker_on_each_other():
    detected = [{"index": i, "name": f"GPU model {i}", "vram_total_mb": 24000} for i in range(4)]
    parsed = config.parse(gpus.config_from_gpus(detected))
    assert (parsed.master.port, parsed.master.device) == (8188, 0)
    assert [(w.id, w.name, w.host, w.port, w.device, w.enabled, w.extra_args) for w in parsed.workers] == [
        (f"worker{n}", f"GPU {n}", "127.0.0.1", 8188 + n, n, True, "") for n in (1, 2, 3)]


def test_config_from_gpus_without_a_gpu_is_a_cpu_setup():
    parsed = config.parse(gpus.config_from_gpus([]))
    assert parsed.master.device is None
    assert [(w.port, w.device, w.extra_args) for w in parsed.workers] == [(8189, None, "--cpu"), (8190, None, "--cpu")]
    master = local_instances.master_instance(parsed, "python")
    assert master.argv[-1] == "--cpu" and "CUDA_VISIBLE_DEVICES" not in master.env


def test_detect_gpus_without_nvidia_smi_is_empty(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpus.detect_gpus() == []


# --- command building ---------------------------------------------------------------------------

def test_build_command_splits_extra_args_into_words():
    argv = local_instances.build_command("/venv/bin/python", "127.0.0.1", 8190, "--lowvram  --preview-method auto")
    assert argv == ["/venv/bin/python", "main.py", "--listen", "127.0.0.1", "--port", "8190",
                    "--lowvram", "--preview-method", "auto"]


def test_build_command_adds_cpu_once():
    assert local_instances.build_command("py", "127.0.0.1", 1, "--cpu --lowvram", cpu=True).count("--cpu") == 1
    assert local_instances.build_command("py", "127.0.0.1", 1, "", cpu=True)[-1] == "--cpu"
    assert "--cpu" not in local_instances.build_command("py", "127.0.0.1", 1, "")


def test_instance_env_pins_the_device_except_on_cpu(tmp_path):
    pinned = local_instances.instance_env(2, False, None)
    assert (pinned["CUDA_VISIBLE_DEVICES"], pinned["CUDA_DEVICE_ORDER"]) == ("2", "PCI_BUS_ID")
    assert "CUDA_VISIBLE_DEVICES" not in local_instances.instance_env(2, True, None)
    assert "CUDA_VISIBLE_DEVICES" not in local_instances.instance_env(None, False, None)
    assert local_instances.instance_env(None, False, tmp_path / "c.json")[config.ENV_VAR] == str(tmp_path / "c.json")


def test_the_master_listens_on_loopback_even_with_remote_workers():
    """Remote workers never connect to the master: nothing outside its machine needs to reach it."""
    local = config.parse({"workers": [{"port": 8189}]})
    remote = config.parse({"workers": [{"port": 8189}, {"port": 8188, "host": "192.168.1.20"}],
                           "master": {"extra_args": "--listen 0.0.0.0"}})
    assert local_instances.master_instance(local, "py").argv[2:4] == ["--listen", "127.0.0.1"]
    argv = local_instances.master_instance(remote, "py").argv
    assert argv[2:4] == ["--listen", "127.0.0.1"] and argv[-2:] == ["--listen", "0.0.0.0"]  # the user's wins
    assert local_instances.worker_instance(remote, remote.workers[0], "py").argv[2:4] == ["--listen", "127.0.0.1"]
    assert not local_instances.worker_instance(remote, remote.workers[1], "py").local


def test_start_worker_runs_the_built_words_without_a_shell(monkeypatch, tmp_path):
    calls: list[tuple[list, dict]] = []

    class FakePopen:
        pid = 4242

        def __init__(self, argv, **kwargs):
            calls.append((argv, kwargs))

        def poll(self):
            return None

    monkeypatch.setattr(local_instances, "LOG_DIR", tmp_path / "logs")
    monkeypatch.setattr(local_instances.subprocess, "Popen", FakePopen)
    parsed = config.parse({"workers": [{"id": "w3", "port": 8191, "device": 3,
                                        "extra_args": "--lowvram --preview-method auto"}]})
    pid = local_instances.LocalProcesses().start_worker(parsed, parsed.workers[0], tmp_path, python="/py")
    argv, kwargs = calls[0]
    assert pid == 4242
    assert argv == ["/py", "main.py", "--listen", "127.0.0.1", "--port", "8191",
                    "--lowvram", "--preview-method", "auto"]
    assert not kwargs.get("shell", False)
    assert kwargs["cwd"] == tmp_path and kwargs["env"]["CUDA_VISIBLE_DEVICES"] == "3"


# --- logs and processes -------------------------------------------------------------------------

@pytest.mark.parametrize("bad_id", ["../secret", "a/b", "..", "", "x.log", "a b", "w\n1"])
def test_log_ids_outside_the_safe_set_are_refused(bad_id):
    with pytest.raises(ValueError):
        local_instances.log_path(bad_id)
    with pytest.raises(ValueError):
        local_instances.read_log_tail(bad_id)


def test_read_log_tail(monkeypatch, tmp_path):
    monkeypatch.setattr(local_instances, "LOG_DIR", tmp_path)
    assert local_instances.read_log_tail("worker1") == ""
    (tmp_path / "worker1.log").write_text("".join(f"line {i}\n" for i in range(5000)), encoding="utf-8")
    assert local_instances.read_log_tail("worker1", 3) == "line 4997\nline 4998\nline 4999"


@POSIX_ONLY
def test_local_processes_start_and_stop_only_their_own(monkeypatch, tmp_path):
    monkeypatch.setattr(local_instances, "LOG_DIR", tmp_path / "logs")
    stubborn = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('ready', flush=True); time.sleep(300)")
    instance = local_instances.Instance("stubborn", "stubborn", 1, "http://127.0.0.1:1",
                                 argv=[sys.executable, "-c", stubborn])
    processes = local_instances.LocalProcesses()
    pid = processes.start(instance, tmp_path)
    try:
        assert processes.is_running("stubborn") and not processes.is_running("other")
        assert os.getsid(pid) == pid  # own session, so its whole group can be stopped
        with pytest.raises(local_instances.LauncherError):
            processes.start(instance, tmp_path)
        wait_until(lambda: "ready" in local_instances.read_log_tail("stubborn"), 60, "the child to start")
        assert not processes.stop_worker("other")
        assert processes.stop_worker("stubborn", grace_s=0.5)  # ignores SIGTERM, so it gets killed
        assert not processes.is_running("stubborn") and not alive(pid)
        assert "sleep(300)" in local_instances.read_log_tail("stubborn")  # the command heads the log
    finally:
        if alive(pid):
            os.killpg(pid, signal.SIGKILL)


def test_run_example_calls_the_example_module(monkeypatch):
    seen: list[str] = []
    module = types.ModuleType("distributed_core.example")
    module.run = lambda url: seen.append(url) or 7
    monkeypatch.setitem(sys.modules, "distributed_core.example", module)
    assert launcher.run_example("http://127.0.0.1:8188") == 7
    assert seen == ["http://127.0.0.1:8188"]
    module.run = lambda url: 1 / 0
    assert launcher.run_example("http://127.0.0.1:8188") == 1  # reported, not raised
    module.run = lambda url, where: seen.append(where) or 0
    assert launcher.run_example("http://127.0.0.1:8188", Path("/out")) == 0 and seen[-1] == Path("/out")


def test_output_folder_is_where_the_master_saves(tmp_path):
    root = tmp_path / "ComfyUI"
    assert launcher.output_folder(root, []) == (root / "output").resolve()
    assert launcher.output_folder(root, ["--output-directory", "/data/out"]) == Path("/data/out").resolve()
    assert launcher.output_folder(root, ["--base-directory=/data"]) == Path("/data/output").resolve()
    assert launcher.output_folder(root, ["--output-directory=rel", "--base-directory", "/x"]) == (root / "rel").resolve()


# --- finding ComfyUI ------------------------------------------------------------------------------

def make_comfy(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "main.py").write_text("", encoding="utf-8")
    return path


def test_find_comfyui_order(monkeypatch, tmp_path):
    holder = make_comfy(tmp_path / "ComfyUI")
    from_env = make_comfy(tmp_path / "env_comfy")
    from_flag = make_comfy(tmp_path / "flag_comfy")
    monkeypatch.setenv("COMFYUI_ROOT", str(from_env))
    monkeypatch.setattr(config, "EXTENSION_DIR", holder / "custom_nodes" / "ComfyUI-Distributed")
    assert launcher.find_comfyui(str(from_flag))[0] == from_flag.resolve()
    assert launcher.find_comfyui(None)[0] == holder
    monkeypatch.setattr(config, "EXTENSION_DIR", tmp_path / "elsewhere" / "ComfyUI-Distributed")
    assert launcher.find_comfyui(None)[0] == from_env.resolve()
    monkeypatch.delenv("COMFYUI_ROOT")
    with pytest.raises(local_instances.LauncherError) as error:
        launcher.find_comfyui(None)
    assert all(option in str(error.value) for option in ("custom_nodes", "COMFYUI_ROOT", "--comfyui"))
    with pytest.raises(local_instances.LauncherError, match="--comfyui"):
        launcher.find_comfyui(str(tmp_path / "missing"))


# --- the command line: dry runs -------------------------------------------------------------------

def test_dry_run_on_four_gpus_shows_devices_ports_and_split_arguments(tmp_path, comfy_stub):
    ports = [9100, 9101, 9102, 9103]
    extra = "--lowvram --preview-method auto"
    path = write_config(tmp_path / "four.json", {
        "master": {"port": ports[0], "device": 0},
        "workers": [{"id": f"gpu{n}", "port": ports[n], "device": n, "extra_args": extra} for n in (1, 2, 3)],
    })
    result = run_launcher("--dry-run", "--config", str(path), "--comfyui", str(comfy_stub))
    assert result.returncode == 0, result.stdout + result.stderr
    blocks = dry_run_blocks(result.stdout)
    assert list(blocks) == ["master", "gpu1", "gpu2", "gpu3"]
    for device, (name, block) in enumerate(blocks.items()):
        assert block["env"]["CUDA_VISIBLE_DEVICES"] == str(device)
        assert block["env"][config.ENV_VAR] == str(path.resolve())
        assert block["port"] == ports[device]
        assert block["argv"][:6] == [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(ports[device])]
        assert block["argv"][6:] == ([] if name == "master" else ["--lowvram", "--preview-method", "auto"])
    assert "--enable-cors-header" not in result.stdout
    assert "nothing is started" in result.stdout


def test_dry_run_cpu_and_only_flags(tmp_path, comfy_stub):
    path = write_config(tmp_path / "c.json", {"master": {"port": 9200, "device": 0},
                                              "workers": [{"id": "w1", "port": 9201, "device": 1,
                                                           "extra_args": "--cpu"}]})
    common = ("--dry-run", "--config", str(path), "--comfyui", str(comfy_stub))
    blocks = dry_run_blocks(run_launcher(*common, "--cpu").stdout)
    assert all(b["argv"].count("--cpu") == 1 and "CUDA_VISIBLE_DEVICES" not in b["env"] for b in blocks.values())
    assert list(dry_run_blocks(run_launcher(*common, "--master-only").stdout)) == ["master"]
    assert list(dry_run_blocks(run_launcher(*common, "--workers-only").stdout)) == ["w1"]
    assert run_launcher(*common, "--master-only", "--workers-only").returncode != 0


def test_dry_run_local_workers_get_the_masters_folders_unless_they_set_their_own(tmp_path, comfy_stub):
    master_args = ("--lowvram --extra-model-paths-config /m/paths.yaml /m/more.yaml --base-directory=/data "
                   "--input-directory /data/in --output-directory /data/out")
    path = write_config(tmp_path / "folders.json", {
        "master": {"port": 9300, "device": 0, "extra_args": master_args},
        "workers": [{"id": "plain", "port": 9301, "device": 1},
                    {"id": "own", "port": 9302, "device": 2, "extra_args": "--output-directory /own/out --fp16-vae"},
                    {"id": "far", "host": "10.0.0.9", "port": 9303}],
    })
    result = run_launcher("--dry-run", "--config", str(path), "--comfyui", str(comfy_stub))
    assert result.returncode == 0, result.stdout + result.stderr
    blocks = dry_run_blocks(result.stdout)
    shared = ["--extra-model-paths-config", "/m/paths.yaml", "/m/more.yaml", "--base-directory=/data",
              "--input-directory", "/data/in"]
    assert blocks["master"]["argv"][6:] == shlex.split(master_args)
    assert blocks["plain"]["argv"][6:] == [*shared, "--output-directory", "/data/out"]  # no --lowvram: not a folder
    assert blocks["own"]["argv"][6:] == ["--output-directory", "/own/out", "--fp16-vae", *shared]
    assert "far" not in blocks  # remote: not started here, nothing handed on


# --- each local worker's own database (ComfyUI 0.38 locks one per folder) ---------------------------

def comfy_038(tmp_path: Path, flags: list[str] | None = None, version: str = "0.38.1") -> Path:
    from comfy_shapes import FLAGS_038, make_comfyui
    return make_comfyui(tmp_path / f"comfyui-{version}", FLAGS_038 if flags is None else flags, version)


def storage_setup(tmp_path: Path, ports: list[int], extra: list[str]) -> Path:
    return write_config(tmp_path / "storage.json", {
        "master": {"port": ports[0], "device": 0},
        "workers": [{"id": f"w{n}", "port": port, "device": n, "extra_args": args}
                    for n, (port, args) in enumerate(zip(ports[1:], extra), 1)]})


def expected_storage(tree: Path, worker_id: str) -> list[str]:
    text = (tree / "comfy" / "cli_args.py").read_text(encoding="utf-8")
    if '"--disable-assets"' in text:
        return ["--disable-assets"]
    if '"--database-url"' in text:
        return ["--database-url", f"sqlite:///{(local_instances.STATE_DIR / f'{worker_id}.db').as_posix()}"]
    return []


def test_local_workers_of_a_0_38_comfyui_get_the_assets_system_off_unless_they_set_their_own(tmp_path):
    tree = comfy_038(tmp_path)
    path = storage_setup(tmp_path, [9500, 9501, 9502, 9503, 9504],
                         ["--lowvram", "--disable-assets", "--database-u=sqlite:////data/w3.db", ""])
    result = run_launcher("--dry-run", "--config", str(path), "--comfyui", str(tree))
    assert result.returncode == 0, result.stdout + result.stderr
    blocks = dry_run_blocks(result.stdout)
    assert blocks["master"]["argv"][6:] == []  # the master keeps ComfyUI's own database
    assert blocks["w1"]["argv"][6:] == ["--lowvram", "--disable-assets"]
    assert blocks["w2"]["argv"][6:] == ["--disable-assets"]  # given once, by the user
    assert blocks["w3"]["argv"][6:] == ["--database-u=sqlite:////data/w3.db"]  # argparse's abbreviation
    assert blocks["w4"]["argv"][6:] == ["--disable-assets"]


def test_local_workers_of_a_comfyui_without_disable_assets_get_a_database_of_their_own(tmp_path):
    from comfy_shapes import FLAGS_038
    tree = comfy_038(tmp_path, [f for f in FLAGS_038 if f not in ("--disable-assets", "--enable-assets")], "0.3.64")
    result = run_launcher("--dry-run", "--config", str(storage_setup(tmp_path, [9510, 9511, 9512], ["", ""])),
                          "--comfyui", str(tree))
    blocks = dry_run_blocks(result.stdout)
    assert blocks["master"]["argv"][6:] == []
    for worker_id in ("w1", "w2"):
        assert blocks[worker_id]["argv"][6:] == expected_storage(tree, worker_id)
        assert blocks[worker_id]["argv"][7].endswith(f"/state/{worker_id}.db")


def test_local_workers_of_the_comfyui_under_test_get_what_it_offers(tmp_path):
    """March 2024 has neither flag (nothing is added), 0.3.64 has --database-url."""
    tree = Path(os.environ["COMFYUI_ROOT"])
    result = run_launcher("--dry-run", "--config", str(storage_setup(tmp_path, [9520, 9521, 9522], ["--cpu", ""])),
                          "--comfyui", str(tree))
    assert result.returncode == 0, result.stdout + result.stderr
    blocks = dry_run_blocks(result.stdout)
    assert blocks["master"]["argv"][6:] == []
    assert blocks["w1"]["argv"][6:] == ["--cpu", *expected_storage(tree, "w1")]
    assert blocks["w2"]["argv"][6:] == expected_storage(tree, "w2")


def test_a_worker_started_from_the_panel_gets_the_same_storage_flags(monkeypatch, tmp_path):
    calls = []

    class FakePopen:
        pid = 4343

        def __init__(self, argv, **kwargs):
            calls.append(argv)

        def poll(self):
            return None

    monkeypatch.setattr(local_instances, "LOG_DIR", tmp_path / "logs")
    monkeypatch.setattr(local_instances.subprocess, "Popen", FakePopen)
    parsed = config.parse({"workers": [{"id": "w3", "port": 8191, "extra_args": "--lowvram"}]})
    local_instances.LocalProcesses().start_worker(parsed, parsed.workers[0], comfy_038(tmp_path), python="/py")
    assert calls[0][6:] == ["--lowvram", "--disable-assets"]


@POSIX_ONLY
@pytest.mark.parametrize("offers", ["--disable-assets", "--database-url"])
def test_a_master_and_workers_of_one_0_38_folder_all_stay_up(tmp_path, launch, offers):
    """The re-created 0.38 start: an instance whose assets system is on locks its database and exits
    with ASSETS_STARTUP_FAILED when another holds it."""
    from comfy_shapes import FLAGS_038
    flags = FLAGS_038 if offers == "--disable-assets" else [f for f in FLAGS_038 if f != "--disable-assets"]
    tree = comfy_038(tmp_path, flags)
    ports = free_ports(3)
    path = storage_setup(tmp_path, ports, ["", ""])
    databases = [local_instances.STATE_DIR / f"{w}.db" for w in ("w1", "w2")]
    for database in databases:
        database.unlink(missing_ok=True)
    try:
        process, out = launch("--config", str(path), "--comfyui", str(tree), "--cpu")
        pids = started_pids(wait_for_output(process, out, "Running.", 120))
        assert sorted(pids) == ["master", "w1", "w2"]
        wait_until(lambda: all(answers(port) for port in ports), 60, "every instance to answer")
        for instance_id in pids:
            log = local_instances.read_log_tail(instance_id)
            assert "ASSETS_STARTUP_FAILED" not in log, log
            assert (offers in log) == (instance_id != "master"), log
        assert all(alive(pid) for pid in pids.values())
        assert all(d.exists() for d in databases) == (offers == "--database-url")
    finally:
        for database in databases:
            database.unlink(missing_ok=True)
            Path(f"{database}.lock").unlink(missing_ok=True)


def test_a_worker_started_by_the_master_gets_the_masters_own_folder_flags():
    conf = config.parse({"master": {"port": 9400}, "workers": [{"id": "w", "port": 9401}]})
    instance = local_instances.worker_instance(conf, conf.workers[0], "py",
                                        master_args=["--port", "9400", "--extra-model-paths-config", "x.yaml"])
    assert instance.argv[6:] == ["--extra-model-paths-config", "x.yaml"]
    assert local_instances.master_folder_args([], "") == []


def test_broken_config_is_an_error_not_defaults(tmp_path, comfy_stub):
    path = tmp_path / "broken.json"
    path.write_text('{"master": {"port": 8188,}', encoding="utf-8")
    result = run_launcher("--dry-run", "--config", str(path), "--comfyui", str(comfy_stub))
    assert result.returncode != 0
    assert "not valid JSON" in result.stderr and str(path) in result.stderr
    assert path.read_text(encoding="utf-8") == '{"master": {"port": 8188,}'
    write_config(path, {"master": {"port": "eight"}})
    result = run_launcher("--dry-run", "--config", str(path), "--comfyui", str(comfy_stub))
    assert result.returncode != 0 and "master.port" in result.stderr


def test_missing_comfyui_names_all_three_ways(tmp_path):
    path = write_config(tmp_path / "c.json", {"master": {"port": 9300}})
    env = {k: v for k, v in launcher_env().items() if k != "COMFYUI_ROOT"}
    result = run_launcher("--dry-run", "--config", str(path), env=env)
    assert result.returncode != 0
    assert all(option in result.stderr for option in ("custom_nodes", "COMFYUI_ROOT", "--comfyui"))


# --- the command line: detection ------------------------------------------------------------------

SMI_OUTPUT = {
    0: [],
    1: ["0, NVIDIA GeForce RTX 4090, 24564"],
    4: [f"{i}, NVIDIA H100 80GB HBM3, 81559" for i in range(4)],
}


def fake_nvidia_smi(bin_dir: Path, lines: list[str] | None, exit_code: int = 0) -> None:
    bin_dir.mkdir()
    if lines is None:
        return
    # printf is a shell builtin: PATH holds nothing but this folder.
    printed = "printf '%s\\n' " + " ".join(shlex.quote(line) for line in lines) if lines else ":"
    script = bin_dir / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{printed}\nexit {exit_code}\n", encoding="utf-8")
    script.chmod(0o755)


@POSIX_ONLY
@pytest.mark.parametrize("case", ["absent", "failing", 0, 1, 4])
def test_detection_writes_a_sensible_config(tmp_path, comfy_stub, case):
    lines = None if case == "absent" else SMI_OUTPUT[4] if case == "failing" else SMI_OUTPUT[case]
    fake_nvidia_smi(tmp_path / "bin", lines, exit_code=9 if case == "failing" else 0)
    target = tmp_path / "new" / "gpu_config.json"
    result = run_launcher("--dry-run", "--config", str(target), "--comfyui", str(comfy_stub),
                          env=launcher_env(PATH=str(tmp_path / "bin")))
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(target) in result.stdout
    written = config.parse(json.loads(target.read_text(encoding="utf-8")))
    gpu_count = case if isinstance(case, int) else 0
    blocks = dry_run_blocks(result.stdout)
    if gpu_count:
        assert (written.master.device, written.master.port) == (0, 8188)
        assert [(w.device, w.port, w.extra_args) for w in written.workers] == [
            (n, 8188 + n, "") for n in range(1, gpu_count)]
        assert SMI_OUTPUT[gpu_count][0].split(", ")[1] in result.stdout  # the name is shown
        assert [b["env"]["CUDA_VISIBLE_DEVICES"] for b in blocks.values()] == [str(n) for n in range(gpu_count)]
    else:
        assert written.master.device is None
        assert [(w.device, w.extra_args) for w in written.workers] == [(None, "--cpu"), (None, "--cpu")]
        assert "No NVIDIA GPU" in result.stdout
        assert all(b["argv"][-1] == "--cpu" and "CUDA_VISIBLE_DEVICES" not in b["env"] for b in blocks.values())
        assert len(blocks) == 3


@POSIX_ONLY
def test_detection_writes_to_the_config_named_by_the_environment(tmp_path, comfy_stub):
    fake_nvidia_smi(tmp_path / "bin", SMI_OUTPUT[1])
    target = tmp_path / "from_env.json"
    result = run_launcher("--dry-run", "--comfyui", str(comfy_stub),
                          env=launcher_env(PATH=str(tmp_path / "bin"), **{config.ENV_VAR: str(target)}))
    assert result.returncode == 0, result.stderr
    assert config.parse(json.loads(target.read_text(encoding="utf-8"))).workers == []
    assert dry_run_blocks(result.stdout)["master"]["env"][config.ENV_VAR] == str(target)


# --- the wrapper scripts --------------------------------------------------------------------------

def test_sh_wrapper_only_picks_python_and_passes_all_arguments():
    text = (REPO / "launch_distributed.sh").read_text(encoding="utf-8")
    code = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert not [line for line in code if re.match(r"(for|while|until|case|function)\b", line)]
    assert all("python" in line.lower() or "VIRTUAL_ENV" in line for line in code
               if re.match(r"(if|elif)\b", line))
    assert re.search(r'^exec "\$python" "\$here/distributed_core/launcher\.py" "\$@"$', text, re.M)


def test_bat_wrapper_only_picks_python_and_passes_all_arguments():
    text = (REPO / "launch_distributed.bat").read_text(encoding="utf-8")
    code = [line.strip() for line in text.splitlines()
            if line.strip() and not line.strip().lower().startswith(("rem ", "@echo off", "::"))]
    lowered = [line.lower() for line in code]
    assert not [line for line in lowered if re.match(r"(for|goto|call)\b", line) or line.startswith(":")]
    assert all("python" in line or "virtual_env" in line for line in lowered if line.startswith("if "))
    assert "..\\..\\..\\python_embeded\\python.exe" in text and "%VIRTUAL_ENV%\\Scripts\\python.exe" in text
    assert any(line.endswith("distributed_core\\launcher.py\" %*") and line.startswith('"%PYTHON%"') for line in code)


@POSIX_ONLY
def test_sh_wrapper_runs_the_launcher_with_relative_paths_from_anywhere(tmp_path, comfy_stub):
    write_config(tmp_path / "rel.json", {"master": {"port": 9400, "device": 0}})
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(sys.executable)
    result = subprocess.run(["sh", str(REPO / "launch_distributed.sh"), "--dry-run", "--config", "rel.json",
                             "--comfyui", comfy_stub.name], cwd=tmp_path, capture_output=True, text=True,
                            env=launcher_env(VIRTUAL_ENV=str(tmp_path / "venv")), timeout=120)
    assert result.returncode == 0, result.stderr
    master = dry_run_blocks(result.stdout)["master"]
    assert master["env"][config.ENV_VAR] == str((tmp_path / "rel.json").resolve())
    assert master["argv"][0] == str(venv_bin / "python")  # the virtual environment's python
    help_text = subprocess.run(["sh", str(REPO / "launch_distributed.sh"), "--help"], capture_output=True,
                               text=True, timeout=60).stdout
    assert all(flag in help_text for flag in ("--master-only", "--workers-only", "--dry-run", "--cpu", "--config",
                                              "--comfyui", "--wait-timeout", "--example"))


# --- running instances (a stand-in ComfyUI) -------------------------------------------------------

def fake_setup(tmp_path: Path, mode: str = "parallel") -> tuple[Path, list[int]]:
    ports = free_ports(3)
    path = write_config(tmp_path / "fake.json", {
        "master": {"port": ports[0], "device": 0},
        "workers": [{"id": "w1", "port": ports[1], "device": 1, "extra_args": "--lowvram"},
                    {"id": "w2", "port": ports[2], "device": 2}],
        "settings": {"mode": mode, "stagger_delay": 0.2},
    })
    return path, ports


@POSIX_ONLY
def test_launcher_leaves_a_running_instance_alone_and_sigterm_stops_the_rest(tmp_path, fake_comfy, launch):
    path, ports = fake_setup(tmp_path, mode="staggered")
    ours = subprocess.Popen([sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(ports[2])],
                            cwd=fake_comfy, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: answers(ports[2]), 60, "the instance started by the test")
        process, out = launch("--config", str(path), "--comfyui", str(fake_comfy), "--cpu")
        output = wait_for_output(process, out, "Running.", 120)
        pids = started_pids(output)
        assert sorted(pids) == ["master", "w1"]
        assert re.search(r"^w2 .* already running", output, re.M)
        assert all(answers(port) for port in ports)
        worker_log = local_instances.read_log_tail("w1")
        assert '["--listen", "127.0.0.1", "--port", "%d", "--lowvram", "--cpu"]' % ports[1] in worker_log
        assert f"CUDA None CONFIG {path.resolve()}" in worker_log
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        assert not any(alive(pid) for pid in pids.values())
        assert not answers(ports[0]) and not answers(ports[1])
        assert ours.poll() is None and answers(ports[2])  # not started by the launcher, so not stopped
    finally:
        ours.kill()
        ours.wait()


@POSIX_ONLY
def test_workers_stop_when_the_master_dies(tmp_path, fake_comfy, launch):
    path, ports = fake_setup(tmp_path)
    process, out = launch("--config", str(path), "--comfyui", str(fake_comfy))
    pids = started_pids(wait_for_output(process, out, "Running.", 120))
    assert local_instances.read_log_tail("w2").count("CUDA 2 ") == 1
    os.kill(pids["master"], signal.SIGKILL)
    assert process.wait(60) != 0
    assert "master exited" in out.read_text(encoding="utf-8")
    assert not alive(pids["w1"]) and not alive(pids["w2"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_instances_die_with_a_killed_launcher(tmp_path, fake_comfy, launch):
    path, ports = fake_setup(tmp_path)
    process, out = launch("--config", str(path), "--comfyui", str(fake_comfy))
    pids = started_pids(wait_for_output(process, out, "Running.", 120))
    process.kill()  # SIGKILL: the launcher cannot clean up itself
    process.wait()
    wait_until(lambda: not any(alive(pid) for pid in pids.values()), 60, "the orphaned instances to die")


# --- running instances (a real ComfyUI on the CPU) ------------------------------------------------

@POSIX_ONLY
def test_real_comfyui_on_cpu_master_and_two_workers_answer_and_sigterm_stops_them(tmp_path, launch):
    comfy_root = os.environ.get("COMFYUI_ROOT")
    if not comfy_root:
        pytest.fail("COMFYUI_ROOT is not set: point it at a ComfyUI folder (the one holding main.py) "
                    "whose requirements the running Python has installed")
    import harness  # tests/harness.py, on the path through conftest.py

    # A private copy of that tree with this extension installed, as a user would have it; the copy
    # also leaves out files that make the tree misbehave outside its package (extra_model_paths.yaml).
    tree = harness.prepare_tree(tmp_path / "comfyui")
    ports = free_ports(3)
    workers = []
    for n in (1, 2):
        dirs = {name: tmp_path / f"cpu{n}" / name for name in ("output", "input", "temp")}
        for folder in dirs.values():
            folder.mkdir(parents=True)
        workers.append({"id": f"cpu{n}", "port": ports[n], "extra_args": " ".join(
            f"--{name}-directory {folder}" for name, folder in dirs.items())})
    # No web frontend is needed to answer /system_stats. A ComfyUI that wants one as a package gets a
    # bare stand-in: through extra_args for the workers, on PYTHONPATH for the master (no extra_args).
    package = tmp_path / "site" / "comfyui_frontend_package"
    (package / "static").mkdir(parents=True)
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "static" / "index.html").write_text("<!doctype html><title>test</title>", encoding="utf-8")
    if "--front-end-root" in (tree / "comfy" / "cli_args.py").read_text(encoding="utf-8"):
        for worker in workers:
            worker["extra_args"] += f" --front-end-root {package / 'static'}"
    path = write_config(tmp_path / "cpu.json", {"master": {"port": ports[0], "device": None}, "workers": workers})
    python_path = os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")]))
    process, out = launch("--cpu", "--config", str(path), "--comfyui", str(tree), "--wait-timeout", "400",
                          env=launcher_env(PYTHONPATH=python_path))
    output = wait_for_output(process, out, "Running.", 480)
    pids = started_pids(output)
    assert sorted(pids) == ["cpu1", "cpu2", "master"], output
    assert all(answers(port) for port in ports)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0, out.read_text(encoding="utf-8")
    assert not any(alive(pid) for pid in pids.values())
    assert not any(answers(port) for port in ports)


def test_a_bare_cors_flag_is_dropped_but_an_origin_is_kept():
    from distributed_core.local_instances import build_command
    assert "--enable-cors-header" not in build_command("py", "127.0.0.1", 8189, "--enable-cors-header --lowvram")
    assert "--enable-cors-header" not in build_command("py", "127.0.0.1", 8189, "--lowvram --enable-cors-header")
    kept = build_command("py", "127.0.0.1", 8189, "--enable-cors-header http://studio.lan:8188")
    assert kept[-2:] == ["--enable-cors-header", "http://studio.lan:8188"]


@POSIX_ONLY
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux's")
def test_started_instances_run_on_their_own_cores_with_capped_pools(tmp_path, fake_comfy, launch):
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        pytest.fail("this test needs two usable CPU cores to give each instance its own")
    ports = free_ports(2)
    path = write_config(tmp_path / "pinned.json", {
        "master": {"port": ports[0], "device": 0, "cpus": str(usable[0]), "threads": 3},
        "workers": [{"id": "w1", "port": ports[1], "device": 1, "cpus": str(usable[1])}],
    })
    dry = run_launcher("--dry-run", "--config", str(path), "--comfyui", str(fake_comfy), "--cpu")
    blocks = dry_run_blocks(dry.stdout)
    assert blocks["master"]["env"]["OMP_NUM_THREADS"] == "3" and blocks["w1"]["env"]["OMP_NUM_THREADS"] == "1"
    assert f"cpus: {usable[0]} (3 threads)" in dry.stdout and f"cpus: {usable[1]} (1 thread)" in dry.stdout
    process, out = launch("--config", str(path), "--comfyui", str(fake_comfy), "--cpu")
    output = wait_for_output(process, out, "Running.", 120)
    pids = started_pids(output)
    assert os.sched_getaffinity(pids["master"]) == {usable[0]}
    assert os.sched_getaffinity(pids["w1"]) == {usable[1]}
    environ = Path(f"/proc/{pids['master']}/environ").read_bytes().split(b"\0")
    assert b"OMP_NUM_THREADS=3" in environ and b"MKL_NUM_THREADS=3" in environ
    assert re.search(rf"^master\s+CPU\s+{usable[0]} \(3 threads\)", output, re.M), output


def test_the_ray_flag_writes_the_ray_section_and_a_bad_one_is_named(tmp_path, comfy_stub):
    path = write_config(tmp_path / "c.json", {"master": {"port": 9300, "device": 0}, "workers": []})
    common = ("--dry-run", "--config", str(path), "--comfyui", str(comfy_stub))
    result = run_launcher(*common, "--ray", "10.0.0.5:6379", "--ray-workers", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Ray:     10.0.0.5:6379, 3 worker(s)" in result.stdout
    assert json.loads(path.read_text())["ray"] == {"address": "10.0.0.5:6379", "workers": 3}
    result = run_launcher(*common, "--ray", "nowhere")
    assert result.returncode == 2 and "ray.address: must be auto, host:port or ray://host:port" in result.stderr
    result = run_launcher(*common, "--ray-workers", "2")
    assert result.returncode == 2 and "--ray-workers needs --ray" in result.stderr
    assert json.loads(path.read_text())["ray"]["workers"] == 3  # the bad ones changed nothing
