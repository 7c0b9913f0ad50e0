"""detect()'s pure parts: mountinfo and /proc/self/cgroup parsing, and the choice of driver, on sample text."""
import pytest

from sandboxd.sandbox.cgroups import CgroupError, make_driver, mounts
from sandboxd.sandbox.cgroups.hybrid import HybridDriver
from sandboxd.sandbox.cgroups.v1 import V1Driver
from sandboxd.sandbox.cgroups.v2 import V2Driver

HYBRID_MOUNTINFO = """\
23 1 0:21 / / rw,relatime - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_CGROUP = """\
9:name=systemd:/
8:pids:/
7:blkio:/
6:freezer:/
5:devices:/
4:memory:/process_api/82888fde
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
"""
V2_MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
26 22 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
27 26 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:3 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
"""
V2_CGROUP = "0::/system.slice/sandboxd.service\n"
V1_MOUNTINFO = """\
25 20 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:4 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:5 - cgroup cgroup rw,xattr,name=systemd
29 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:8 - cgroup cgroup rw,cpu,cpuacct
30 25 0:27 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:9 - cgroup cgroup rw,memory
31 25 0:28 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,pids
32 25 0:29 / /sys/fs/cgroup/freezer rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,freezer
"""
V1_CGROUP = """\
5:freezer:/
4:pids:/system.slice/sandboxd.service
3:memory:/system.slice/sandboxd.service
2:cpu,cpuacct:/system.slice/sandboxd.service
1:name=systemd:/system.slice/sandboxd.service
"""
ALL_V2 = frozenset({"cpuset", "cpu", "io", "memory", "hugetlb", "pids", "rdma", "misc"})


def found(mountinfo, cgroup):
    return mounts.hierarchies(mounts.parse_mountinfo(mountinfo), mounts.parse_proc_cgroup(cgroup))


def test_parse_mountinfo_keeps_only_cgroup_mounts():
    parsed = mounts.parse_mountinfo(HYBRID_MOUNTINFO)
    assert [m.mountpoint for m in parsed][0] == "/sys/fs/cgroup/cpu"
    assert len(parsed) == 10
    assert parsed[-1] == mounts.Mount("cgroup2", "/", "/sys/fs/cgroup/unified", True, frozenset({"rw"}))


def test_parse_mountinfo_optional_fields_and_escapes():
    text = r"40 31 0:37 /a\040b /mnt/c\040g rw shared:9 master:2 - cgroup2 cgroup2 rw,nsdelegate" + "\n"
    [m] = mounts.parse_mountinfo(text)
    assert (m.root, m.mountpoint, m.super_options) == ("/a b", "/mnt/c g", frozenset({"rw", "nsdelegate"}))


def test_parse_proc_cgroup_splits_comounted_controllers():
    paths = mounts.parse_proc_cgroup(V1_CGROUP + "0::/x (deleted)\n")
    assert paths["cpu"] == paths["cpuacct"] == "/system.slice/sandboxd.service"
    assert paths["name=systemd"] == "/system.slice/sandboxd.service"
    assert paths[""] == "/x"


def test_hybrid_host():
    hs = found(HYBRID_MOUNTINFO, HYBRID_CGROUP)
    memory = next(h for h in hs if "memory" in h.controllers)
    assert memory.dir(memory.own) == "/sys/fs/cgroup/memory/process_api/82888fde"
    assert mounts.choose_kind(hs, frozenset({"hugetlb"}), (6, 18)) == "hybrid"
    driver = make_driver("hybrid", hs)
    assert isinstance(driver, HybridDriver)
    assert driver.parents == {"unified": "/sys/fs/cgroup/unified/sandboxd",
                              "memory": "/sys/fs/cgroup/memory/process_api/82888fde/sandboxd",
                              "pids": "/sys/fs/cgroup/pids/sandboxd", "cpu": "/sys/fs/cgroup/cpu/sandboxd",
                              "cpuacct": "/sys/fs/cgroup/cpuacct/sandboxd"}


def test_hybrid_falls_back_to_v1_without_cgroup_kill_or_writable_cgroup2():
    hs = found(HYBRID_MOUNTINFO, HYBRID_CGROUP)
    assert mounts.choose_kind(hs, frozenset(), (5, 10)) == "v1"
    ro = found(HYBRID_MOUNTINFO.replace("/sys/fs/cgroup/unified rw,", "/sys/fs/cgroup/unified ro,"), HYBRID_CGROUP)
    assert mounts.choose_kind(ro, frozenset(), (6, 1)) == "v1"


def test_pure_v2_host():
    hs = found(V2_MOUNTINFO, V2_CGROUP)
    assert [h.version for h in hs] == [2]
    assert mounts.choose_kind(hs, ALL_V2, (6, 1)) == "v2"
    driver = make_driver("v2", hs, parent_name="sbx")
    assert isinstance(driver, V2Driver)
    assert driver.parent == "/sys/fs/cgroup/system.slice/sandboxd.service/sbx"


def test_v2_driver_in_its_daemon_leaf_uses_the_cgroup_above():
    hs = found(V2_MOUNTINFO, "0::/system.slice/sandboxd.service/sandboxd-daemon\n")
    assert make_driver("v2", hs).parent == "/sys/fs/cgroup/system.slice/sandboxd.service/sandboxd"


def test_v2_parent_path():
    hs = found(V2_MOUNTINFO, V2_CGROUP)
    assert make_driver("v2", hs, parent_path="/sandboxd.slice/runs").parent == "/sys/fs/cgroup/sandboxd.slice/runs"


def test_v2_without_controllers_still_picks_v2_so_setup_can_say_what_is_missing():
    assert mounts.choose_kind(found(V2_MOUNTINFO, V2_CGROUP), frozenset(), (6, 1)) == "v2"


def test_v1_host_with_comounted_cpu_cpuacct():
    hs = found(V1_MOUNTINFO, V1_CGROUP)
    assert mounts.choose_kind(hs, frozenset(), (6, 1)) == "v1"
    driver = make_driver("v1", hs)
    assert isinstance(driver, V1Driver)
    assert driver.parents["cpu"] == driver.parents["cpuacct"] == \
        "/sys/fs/cgroup/cpu,cpuacct/system.slice/sandboxd.service/sandboxd"
    assert driver.parents["freezer"] == "/sys/fs/cgroup/freezer/sandboxd"
    assert len(driver._unique_parents()) == 4


def test_container_mount_root_maps_to_the_mountpoint():
    mountinfo = "30 25 0:27 /docker/abc /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n"
    [h] = found(mountinfo, "0::/docker/abc/app\n")
    assert h.dir(h.own) == "/sys/fs/cgroup/app"
    assert found(mountinfo, "0::/elsewhere\n") == []       # our cgroup is not visible through that mount


def test_no_cgroups_is_an_error():
    with pytest.raises(CgroupError, match="no usable cgroups"):
        mounts.choose_kind([], frozenset(), (6, 1))


def test_v1_without_freezer_or_cgroup2_is_an_error():
    hs = found(V1_MOUNTINFO.replace("rw,freezer", "rw,devices"), V1_CGROUP)
    with pytest.raises(CgroupError, match="freezer"):
        mounts.choose_kind(hs, frozenset(), (6, 1))


@pytest.mark.parametrize("release, expected", [("6.1.0-18-amd64", (6, 1)), ("5.14.0", (5, 14)), ("x", (0, 0))])
def test_kernel_version(release, expected):
    assert mounts.kernel_version(release) == expected


def test_detect_reads_files(tmp_path):
    from sandboxd.sandbox.cgroups import detect
    (tmp_path / "mountinfo").write_text(V1_MOUNTINFO)
    (tmp_path / "cgroup").write_text(V1_CGROUP)
    driver = detect(parent_name="x", mountinfo=str(tmp_path / "mountinfo"), proc_cgroup=str(tmp_path / "cgroup"))
    assert driver.name == "v1"
