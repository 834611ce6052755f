"""zinf.initialize on two machines: two network namespaces joined by a
veth pair stand in for two hosts (each with its own interfaces and
addresses; the host name still resolves to 127.0.0.1 in both, as a
container's or Debian's /etc/hosts makes it). Two ranks per "node", ranks
0-1 on node 0 (MASTER_ADDR) and 2-3 on node 1; the parameters after K steps
equal plain training on the global batch. Needs root (ip netns); skips
saying so otherwise.
"""
import os
import subprocess
import sys
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import test_initialize as base  # noqa: E402

NODES = 2
PER_NODE = 2


def _ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    """Two namespaces, 10.231.<n>.1 and .2 on the two ends of a veth pair;
    yields (namespace names, node 0's address)."""
    if os.geteuid() != 0:
        pytest.skip("two-host test: needs root for ip netns (not root here)")
    tag = uuid.uuid4().hex[:6]
    names = [f"zinf-{tag}-{n}" for n in range(NODES)]
    links = [f"zv{tag}{n}" for n in range(NODES)]
    subnet = f"10.231.{int(tag[:2], 16)}"
    made = []
    try:
        for name in names:
            result = _ip("netns", "add", name)
            if result.returncode != 0:
                pytest.skip(f"two-host test: ip netns add failed here: {result.stderr.strip()}")
            made.append(name)
        steps = [("link", "add", links[0], "type", "veth", "peer", "name", links[1])]
        for n in range(NODES):
            steps += [("link", "set", links[n], "netns", names[n]),
                      ("-n", names[n], "addr", "add", f"{subnet}.{n + 1}/24", "dev", links[n]),
                      ("-n", names[n], "link", "set", links[n], "up"),
                      ("-n", names[n], "link", "set", "lo", "up")]
        for step in steps:
            result = _ip(*step)
            if result.returncode != 0:
                pytest.skip(f"two-host test: ip {' '.join(step)} failed here: {result.stderr.strip()}")
        yield names, f"{subnet}.1"
    finally:
        for name in made:
            _ip("netns", "del", name)  # takes its end of the veth pair with it


@pytest.mark.parametrize("stage,optimizer_device,param_device", [(2, "cpu", "none"), (3, "nvme", "nvme")])
def test_two_hosts_train_as_one_process(two_hosts, scratch, stage, optimizer_device, param_device):
    names, master = two_hosts
    config = base.config_for(stage, optimizer_device, param_device, nvme=os.path.join(scratch, "nvme"),
                             gradient_accumulation_steps=2, zinf={"timeout_s": 60})
    codes, errors, result = base.launch(NODES * PER_NODE, {"config": config, "steps": 3}, scratch, master=master,
                                        per_node=PER_NODE,
                                        prefix=lambda rank: ["ip", "netns", "exec", names[rank // PER_NODE]])
    # Gloo would listen on 127.0.0.1 (the host name's address) and node 1's
    # ranks could not connect back: zinf picks the interface towards node 0.
    assert codes == [0] * (NODES * PER_NODE), "\n".join(errors)
    state, losses, _ = base.reference(config, 3, NODES * PER_NODE)
    base.assert_matches(result, state, losses)
