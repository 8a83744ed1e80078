import { DeviceChangeAction, DeviceChangeOutcome, NetworkService, VmState } from "@vmenv/api/agent/v1";
import { createDaemonClient } from "@vmenv/rpc";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type RunningAgent, run, startAgent } from "./support/agent.js";
import { clients, consoleRun, done, guestVm, isReady, until } from "./support/vm.js";

/** A random /24 in 198.18.0.0/15 (the benchmarking range): no clash with the host's or other runs' nets. */
const randomNet = (second: 18 | 19) => `198.${second}.${Math.floor(Math.random() * 250) + 2}`;

describe("VMs on networks: real bridges and taps, real QEMU (TCG)", () => {
  let agent: RunningAgent;
  let c: ReturnType<typeof clients>;
  let net: ReturnType<typeof createDaemonClient<typeof NetworkService>>;
  const links = new Set<string>();
  const lan = randomNet(18);
  const other = randomNet(19);
  const suffix = Math.random().toString(36).slice(2, 7);

  beforeAll(async () => {
    agent = await startAgent(["--kvm-probe-timeout-ms", "200"]);
    c = clients(agent.socket);
    net = createDaemonClient(NetworkService, { socket: agent.socket, timeoutMs: 60_000 });
    for (const [id, prefix] of [
      [`lan-${suffix}`, lan],
      [`other-${suffix}`, other],
    ] as const) {
      const n = await net.createNetwork({ networkId: id, network: { cidr: `${prefix}.0/24` } });
      links.add(n.bridgeName);
    }
  });
  afterAll(async () => {
    // The agent's own cleanup first (ports, then networks); whatever is left is removed by name.
    for (const vm of ["a", "b", "c"])
      await c?.vms
        .deleteVm({ name: `vms/${vm}`, force: true, allowMissing: true })
        .then((op) => done(c, op))
        .catch(() => undefined);
    for (const p of (await net?.listPorts({}).catch(() => undefined))?.ports ?? []) links.add(p.tapName);
    for (const id of [`lan-${suffix}`, `other-${suffix}`])
      await net?.deleteNetwork({ name: `networks/${id}` }).catch(() => undefined);
    await agent?.stop();
    for (const l of links) await run("ip", ["link", "del", l]);
    const left = (await run("ip", ["-o", "link"])).stdout
      .split("\n")
      .filter((l) => [...links].some((x) => l.includes(`${x}:`)));
    expect(left).toEqual([]);
  });

  const nicVm = async (id: string, network: string) => {
    const req = await guestVm(id);
    (req.vm.spec as { nics?: unknown[] }).nics = [{ id: "eth0", network: `networks/${network}` }];
    await done(c, await c.vms.createVm(req));
    return until(() => c.vms.getVm({ name: `vms/${id}` }), isReady, 90_000, `${id} ready`);
  };
  const ping = async (vm: string, ip: string) =>
    (
      await consoleRun(
        c,
        `vms/${vm}`,
        `ping -c 2 -W 2 ${ip} >/dev/null 2>&1 && echo PING-OK-$((7*6)) || echo PING-NO-$((7*6))`,
        /PING-(OK|NO)-42/,
        30_000,
      )
    )[1];

  it("gives two VMs on one network addresses they reach each other and the gateway on, and keeps another network apart", async () => {
    const [a, b, cc] = await Promise.all([
      nicVm("a", `lan-${suffix}`),
      nicVm("b", `lan-${suffix}`),
      nicVm("c", `other-${suffix}`),
    ]);
    for (const v of [a, b, cc]) expect(v.state).toBe(VmState.RUNNING);
    const ipOf = (v: typeof a) => v.spec?.nics[0]?.ipAddress ?? "";
    expect(ipOf(a)).toMatch(new RegExp(`^${lan.replaceAll(".", "\\.")}\\.\\d+$`));
    expect(ipOf(b)).not.toBe(ipOf(a));
    expect(a.spec?.nics[0]?.macAddress).toMatch(/^52:54:00(:[0-9a-f]{2}){3}$/);
    const ports = (await net.listPorts({ parent: `networks/lan-${suffix}` })).ports;
    expect(ports.map((p) => p.vm).sort()).toEqual(["vms/a", "vms/b"]);
    for (const p of ports) links.add(p.tapName);

    expect(await ping("a", ipOf(b))).toBe("OK");
    expect(await ping("b", ipOf(a))).toBe("OK");
    expect(await ping("a", `${lan}.1`)).toBe("OK"); // the gateway, on the host's bridge
    expect(await ping("c", `${other}.1`)).toBe("OK"); // c's own network works…
    expect(await ping("c", ipOf(a))).toBe("NO"); // …but does not reach the other one

    // A NIC on the first network, hot-plugged into c through a change set: APPLIED, then NOOP.
    const bind = {
      name: "vms/c",
      changes: [
        {
          action: DeviceChangeAction.BIND,
          device: { case: "nic" as const, value: { id: "eth1", network: `networks/lan-${suffix}` } },
        },
      ],
    };
    const applied = await c.vms.commitVmDeviceChanges(bind);
    expect(applied.results.map((r) => r.outcome)).toEqual([DeviceChangeOutcome.APPLIED]);
    expect((await c.vms.commitVmDeviceChanges(bind)).results.map((r) => r.outcome)).toEqual([
      DeviceChangeOutcome.NOOP,
    ]);
    const hot = applied.vm?.spec?.nics.find((n) => n.id === "eth1");
    for (const p of (await net.listPorts({ parent: `networks/lan-${suffix}` })).ports) links.add(p.tapName);
    await consoleRun(
      c,
      "vms/c",
      `until ip link show eth1 >/dev/null 2>&1; do sleep 0.2; done; ip addr add ${hot?.ipAddress}/24 dev eth1; ip link set eth1 up; echo UP-$((5+5))`,
      /UP-10/,
    );
    expect(await ping("c", ipOf(a))).toBe("OK");

    // Deleting a VM gives its port (and tap) back.
    await done(c, await c.vms.deleteVm({ name: "vms/b", force: true }));
    const left = (await net.listPorts({ parent: `networks/lan-${suffix}` })).ports.map((p) => p.vm);
    expect(left.sort()).toEqual(["vms/a", "vms/c"]);
  });
});
