"""CPU cores and thread pools for local instances (distributed_core/cpus.py and the launcher's use
of it): pure logic on described machines, and the affinity and caps of real started processes."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from distributed_core import config, cpus, gpus, local_instances  # noqa: E402

# Two sockets of 8 cores with hyperthreads, numbered as Linux numbers them: core k is CPUs k and k+16.
TWO_SOCKETS = cpus.Machine(
    cpus=tuple(range(32)),
    cores=tuple((k, k + 16) for k in range(16)),
    numa=((0, tuple(range(0, 8)) + tuple(range(16, 24))), (1, tuple(range(8, 16)) + tuple(range(24, 32)))),
    gpu_nodes=((0, 0), (1, 0), (2, 1), (3, 1)),
)


@pytest.mark.parametrize("text, expected", [("0", [0]), ("0-3,8", [0, 1, 2, 3, 8]), (" 2 - 3 , 1 ", [1, 2, 3])])
def test_cpulist_round_trip(text, expected):
    assert cpus.parse_cpulist(text) == expected
    assert cpus.parse_cpulist(cpus.format_cpulist(expected)) == expected


@pytest.mark.parametrize("bad", ["", "a", "3-1", "0,,1", "0-", "-1", "99999"])
def test_bad_cpulists_are_refused(bad):
    with pytest.raises(cpus.CpuListError):
        cpus.parse_cpulist(bad)


def test_instances_get_disjoint_whole_cores_on_their_gpus_numa_node():
    placed = cpus.allocate([("master", 0), ("w1", 1), ("w2", 2), ("w3", 3)], TWO_SOCKETS)
    assert placed["master"] == [0, 1, 2, 3, 16, 17, 18, 19]
    assert placed["w1"] == [4, 5, 6, 7, 20, 21, 22, 23]
    assert placed["w2"] == [8, 9, 10, 11, 24, 25, 26, 27]
    assert placed["w3"] == [12, 13, 14, 15, 28, 29, 30, 31]
    every = [cpu for chosen in placed.values() for cpu in chosen]
    assert sorted(every) == list(range(32))  # disjoint and complete
    assert cpus.threads_for(placed["master"], TWO_SOCKETS) == 4  # one thread per core, not per hyperthread


def test_unknown_numa_nodes_split_all_cores_in_order():
    machine = cpus.Machine(cpus=tuple(range(6)))
    placed = cpus.allocate([("master", 0), ("w1", 1), ("w2", None), ("w3", 5)], machine)
    assert placed == {"master": [0, 1], "w1": [2, 3], "w2": [4], "w3": [5]}


def test_a_crowded_numa_node_falls_back_to_the_whole_machine():
    machine = cpus.Machine(cpus=tuple(range(4)), numa=((0, (0,)), (1, (1, 2, 3))), gpu_nodes=((0, 0), (1, 0)))
    placed = cpus.allocate([("master", 0), ("w1", 1)], machine)
    assert placed == {"master": [0, 1], "w1": [2, 3]}


def test_fewer_cores_than_instances_pins_nobody():
    assert cpus.allocate([("a", None), ("b", None), ("c", None)], cpus.Machine(cpus=(0, 1))) == {}


def test_config_overrides_keep_their_cores_and_the_rest_is_shared_out():
    cfg = config.parse({"master": {"port": 8188, "device": 0, "cpus": "0-1", "threads": 3},
                        "workers": [{"id": "w1", "port": 8189, "device": 1},
                                    {"id": "w2", "port": 8190, "device": 2, "cpus": "off"},
                                    {"id": "w3", "port": 8191, "device": 3},
                                    {"id": "far", "host": "10.9.9.9", "port": 8188, "device": 0}]})
    placed = local_instances.cpu_placements(cfg, machine=cpus.Machine(cpus=tuple(range(8))))
    assert placed["master"] == ([0, 1], 3)
    assert placed["w1"] == ([2, 3, 4], 3) and placed["w3"] == ([5, 6, 7], 3)
    assert placed["w2"] == ([], 0)       # "off": not pinned, pools left to ComfyUI
    assert "far" not in placed           # a remote worker is started elsewhere
    assert config.parse(cfg.to_dict()).to_dict() == cfg.to_dict()
    assert "cpus" not in config.parse({"master": {"port": 8188}}).to_dict()["master"]  # unset stays unwritten


@pytest.mark.parametrize("entry, field", [({"cpus": "zero"}, "master.cpus"), ({"cpus": 3}, "master.cpus"),
                                          ({"threads": -1}, "master.threads"), ({"threads": "8"}, "master.threads")])
def test_bad_cpu_fields_name_the_field(entry, field):
    with pytest.raises(config.ConfigError) as caught:
        config.parse({"master": {"port": 8188, **entry}})
    assert any(e.startswith(field) for e in caught.value.errors), caught.value.errors


def test_probe_reads_cores_nodes_and_gpu_nodes_from_sys(tmp_path):
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
    for cpu in usable:
        folder = tmp_path / f"devices/system/cpu/cpu{cpu}/topology"
        folder.mkdir(parents=True)
        folder.joinpath("thread_siblings_list").write_text(f"{cpu}\n")
    node = tmp_path / "devices/system/node/node0"
    node.mkdir(parents=True)
    node.joinpath("cpulist").write_text(cpus.format_cpulist(usable) + "\n")
    device = tmp_path / "bus/pci/devices/0000:18:00.0"
    device.mkdir(parents=True)
    device.joinpath("numa_node").write_text("0\n")
    machine = cpus.probe({3: "00000000:18:00.0", 4: "00000000:99:00.0"}, root=tmp_path)
    assert machine.cpus == tuple(usable)
    assert machine.cores == tuple((cpu,) for cpu in usable)
    assert machine.numa == ((0, tuple(usable)),)
    assert machine.gpu_nodes == ((3, 0),)  # the second GPU's folder is missing: left out


def test_parse_bus_ids_skips_what_is_not_a_bus_id():
    assert gpus.parse_bus_ids("0, 00000000:18:00.0\n1, 00000000:3B:00.0\n0, NVIDIA H100, 81559\n") == {
        0: "00000000:18:00.0", 1: "00000000:3B:00.0"}


def test_instance_env_caps_every_thread_pool():
    env = local_instances.instance_env(1, False, None, threads=6)
    assert all(env[name] == "6" for name in cpus.THREAD_VARIABLES)
    assert not set(cpus.THREAD_VARIABLES) & set(local_instances.instance_env(1, False, None))
