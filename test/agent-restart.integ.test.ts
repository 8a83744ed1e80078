import { BlockService, NetworkService, VmState, VolumeBackend, VolumeFormat } from "@vmenv/api/agent/v1";
import { createDaemonClient } from "@vmenv/rpc";
import { afterAll, describe, expect, it } from "vitest";
import { type RunningAgent, run, startAgent } from "./support/agent.js";
import { daemonsUnder } from "./support/storage-daemons.js";
import { clients, consoleRun, done, guestVm, isReady, MIB, qemusUnder, until } from "./support/vm.js";

const links = async () =>
  (await run("ip", ["-o", "link"])).stdout
    .split("\n")
    .map((l) => /^\d+: ([^:@]+)/.exec(l)?.[1] ?? "")
    .filter(Boolean);

describe("agent SIGKILL and restart: networks, taps, addresses and storage daemons are re-adopted, nothing leaks", () => {
  const agents: RunningAgent[] = [];
  const mine = new Set<string>();
  const suffix = Math.random().toString(36).slice(2, 7);
  const cidr = `198.18.${Math.floor(Math.random() * 250) + 2}.0/24`;
  afterAll(async () => {
    for (const a of agents.reverse()) await a.stop();
    for (const l of mine) await run("ip", ["link", "del", l]);
  });

  it("re-adopts everything after kill -9 of the agent, restarts a storage daemon that died in use, and leaves nothing after deletes", async () => {
    const first = await startAgent(["--kvm-probe-timeout-ms", "200"]);
    agents.push(first);
    const clientsOf = (a: RunningAgent) => ({
      ...clients(a.socket),
      net: createDaemonClient(NetworkService, { socket: a.socket, timeoutMs: 60_000 }),
      block: createDaemonClient(BlockService, { socket: a.socket, timeoutMs: 60_000 }),
    });
    let c = clientsOf(first);
    const network = await c.net.createNetwork({ networkId: `rs-${suffix}`, network: { cidr } });
    mine.add(network.bridgeName);
    await done(
      c,
      await c.block.createVolume({
        volumeId: "vu",
        volume: {
          store: "stores/default",
          format: VolumeFormat.QCOW2,
          sizeBytes: 32n * MIB,
          backend: VolumeBackend.VHOST_USER_BLK,
        },
      }),
    );
    const req = await guestVm("a");
    Object.assign(req.vm.spec, {
      nics: [{ id: "eth0", network: network.name }],
      disks: [{ id: "data", volume: "volumes/vu", readOnly: false }],
    });
    await done(c, await c.vms.createVm(req));
    await until(() => c.vms.getVm({ name: "vms/a" }), isReady, 90_000, "a ready");
    await consoleRun(
      c,
      "vms/a",
      "echo before-kill | dd of=/dev/vda bs=512 conv=sync 2>/dev/null; sync; echo wrote-$((2+1))",
      /wrote-3/,
    );
    const [port] = (await c.net.listPorts({ parent: network.name })).ports;
    if (!port) throw new Error("no port");
    mine.add(port.tapName);
    const qemu = await qemusUnder(first.dir);
    const daemon = await daemonsUnder(first.dir);
    expect(qemu).toHaveLength(1);
    expect(daemon).toHaveLength(1);

    // kill -9: the VM, its tap and its storage daemon keep running.
    await first.kill();
    expect(await qemusUnder(first.dir)).toEqual(qemu);
    expect(await daemonsUnder(first.dir)).toEqual(daemon);
    const second = await startAgent(["--kvm-probe-timeout-ms", "200"], {}, { dir: first.dir });
    agents.push(second);
    c = clientsOf(second);

    // Everything is found again, and nothing is duplicated.
    const a = await c.vms.getVm({ name: "vms/a" });
    expect(a.state).toBe(VmState.RUNNING);
    expect((await c.net.getNetwork({ name: network.name })).bridgeName).toBe(network.bridgeName);
    const [again] = (await c.net.listPorts({ parent: network.name })).ports;
    expect(again).toMatchObject({
      tapName: port.tapName,
      ipAddress: port.ipAddress,
      macAddress: port.macAddress,
    });
    expect(await qemusUnder(first.dir)).toEqual(qemu);
    // Give the reconcile a moment: the adopted daemon must stay the only one.
    await new Promise((r) => setTimeout(r, 1500));
    expect(await daemonsUnder(first.dir)).toEqual(daemon);
    expect((await c.block.getVolume({ name: "volumes/vu" })).backendAddress).toMatch(/export\.sock$/);
    // The guest still reaches its disk through the adopted daemon.
    await consoleRun(
      c,
      "vms/a",
      "dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -c 11 | tr a-z A-Z; echo",
      /BEFORE-KILL/,
    );

    // Allocations survived: a new VM on the network gets another address.
    const reqB = await guestVm("b");
    Object.assign(reqB.vm.spec, { nics: [{ id: "eth0", network: network.name }] });
    await done(c, await c.vms.createVm(reqB));
    const ports = (await c.net.listPorts({ parent: network.name })).ports;
    for (const p of ports) mine.add(p.tapName);
    expect(new Set(ports.map((p) => p.ipAddress)).size).toBe(2);

    // A storage daemon that dies while its volume is in use is started again (one, not two).
    process.kill(daemon[0] as number, "SIGKILL");
    const restarted = await until(
      () => daemonsUnder(first.dir),
      (p) => p.length === 1 && p[0] !== daemon[0],
      30_000,
      "storage daemon restarted",
    );
    await new Promise((r) => setTimeout(r, 1000));
    expect(await daemonsUnder(first.dir)).toEqual(restarted);

    // Deleting everything leaves no VMM, no daemon, no tap, no bridge.
    for (const vm of ["a", "b"]) await done(c, await c.vms.deleteVm({ name: `vms/${vm}`, force: true }));
    await done(c, await c.block.deleteVolume({ name: "volumes/vu" }));
    await c.net.deleteNetwork({ name: network.name });
    await until(
      () => daemonsUnder(first.dir),
      (p) => p.length === 0,
      20_000,
      "no storage daemon",
    );
    expect(await qemusUnder(first.dir)).toEqual([]);
    const left = (await links()).filter((l) => mine.has(l));
    expect(left).toEqual([]);
  });
});
