/**
 * Live migration of VMs with NICs between two hosts that share a layer-2 segment, through the
 * coordinator. Each agent runs in a network namespace of its own, as on two machines: its bridge joins
 * the segment through an uplink (a veth into a "segment" namespace, whose bridge stands for the
 * physical switch and holds the segment's router address). The coordinator runs in the segment
 * namespace and reaches the agents over a second, management, segment, which also carries the
 * migration streams. The test pings the guests from the segment's router across the move, then starts
 * a guest on the emptied host, to which the coordinator gives the next free address of the segment
 * (ADR 20), and has it ping a moved guest. Everything lives in the three namespaces, deleted at the end.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { rm } from "node:fs/promises";
import { NetworkService } from "@vmenv/api/agent/v1";
import { MemberState } from "@vmenv/api/coordinator/v1";
import { createDaemonClient } from "@vmenv/rpc";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type RunningAgent, run, startAgent } from "./support/agent.js";
import { type RunningCoordinator, startCoordinator } from "./support/coordinator.js";
import {
  agentClients,
  type CoordinatorClients,
  coordinatorClients,
  envOf,
  guestMember,
  succeeded,
  vmsOn,
} from "./support/env.js";
import { guestImage } from "./support/guest.js";
import { clients, consoleRun, isReady, MIB, qemusUnder, until } from "./support/vm.js";

/** A ping running in a namespace; `stop()` ends it and tells which replies came back. */
function pinger(ns: string, ip: string, intervalMs: number) {
  const p: ChildProcess = spawn(
    "ip",
    ["netns", "exec", ns, "ping", "-n", "-i", String(intervalMs / 1000), ip],
    {
      stdio: ["ignore", "pipe", "pipe"],
    },
  );
  let out = "";
  p.stdout?.setEncoding("utf8").on("data", (d: string) => (out += d));
  const exited = new Promise((r) => p.once("exit", r));
  return {
    stop: async () => {
      p.kill("SIGINT");
      await exited;
      const m = /(\d+) packets transmitted, (\d+) received/.exec(out);
      const seqs = new Set([...out.matchAll(/icmp_seq=(\d+)/g)].map((x) => Number(x[1])));
      const sent = Number(m?.[1] ?? 0);
      // The longest run of requests without a reply: how long the guest was unreachable.
      let run = 0;
      let longest = 0;
      for (let s = 1; s <= sent; s++) {
        run = seqs.has(s) ? 0 : run + 1;
        longest = Math.max(longest, run);
      }
      return { sent, received: Number(m?.[2] ?? 0), longestGapMs: longest * intervalMs, out };
    },
  };
}

describe("live migration of guests with NICs between two hosts on one segment (namespaces, TCG)", () => {
  const sfx = Math.random().toString(36).slice(2, 7);
  const [seg, nsA, nsB] = [`vmenv-seg-${sfx}`, `vmenv-ha-${sfx}`, `vmenv-hb-${sfx}`];
  const k = Math.floor(Math.random() * 250) + 2;
  const lan = `10.77.${k}`; // the guests' segment; its router is .1 in `seg`
  const mgmt = `10.78.${k}`; // coordinator ↔ agents, and the migration streams
  let coord: RunningCoordinator | undefined;
  let c: CoordinatorClients;
  const agents: RunningAgent[] = [];
  const pings: ReturnType<typeof pinger>[] = [];
  const inNs = (ns: string, cmd: string, args: string[]) => run("ip", ["netns", "exec", ns, cmd, ...args]);
  const ip = async (ns: string, ...args: string[]) => {
    const r = await run("ip", ["-n", ns, ...args]);
    if (r.code !== 0) throw new Error(`ip -n ${ns} ${args.join(" ")}: ${r.stderr}`);
  };

  beforeAll(async () => {
    await guestImage();
    for (const ns of [seg, nsA, nsB]) {
      await run("ip", ["netns", "add", ns]);
      await ip(ns, "link", "set", "lo", "up");
    }
    // The segment: a switch for the guests (holding their router's address) and one for management.
    await ip(seg, "link", "add", "name", "sw0", "type", "bridge");
    await ip(seg, "addr", "add", `${lan}.1/24`, "dev", "sw0");
    await ip(seg, "link", "add", "name", "mg0", "type", "bridge");
    await ip(seg, "addr", "add", `${mgmt}.1/24`, "dev", "mg0");
    for (const [i, ns] of [nsA, nsB].entries()) {
      const host = i === 0 ? "a" : "b";
      // The host's uplink to the guests' switch (the agent makes it a port of its bridge) …
      await ip(seg, "link", "add", "name", `sw-${host}`, "type", "veth", "peer", "name", "up0", "netns", ns);
      await ip(seg, "link", "set", "dev", `sw-${host}`, "master", "sw0", "up");
      // … and its management interface, with an address.
      await ip(seg, "link", "add", "name", `mg-${host}`, "type", "veth", "peer", "name", "mgmt", "netns", ns);
      await ip(seg, "link", "set", "dev", `mg-${host}`, "master", "mg0", "up");
      await ip(ns, "addr", "add", `${mgmt}.${i + 2}/24`, "dev", "mgmt");
      await ip(ns, "link", "set", "dev", "mgmt", "up");
    }
    for (const l of ["sw0", "mg0"]) await ip(seg, "link", "set", "dev", l, "up");

    for (const [i, ns] of [nsA, nsB].entries())
      agents.push(await startAgent([], {}, { netns: ns, listen: `${mgmt}.${i + 2}:0` }));
    // The same network on both hosts, joined to the segment by the uplink.
    for (const a of agents) {
      const net = createDaemonClient(NetworkService, { socket: a.socket, timeoutMs: 30_000 });
      await net.createNetwork({ networkId: "lan", network: { cidr: `${lan}.0/24`, uplink: "up0" } });
    }
    coord = await startCoordinator(
      ["--heartbeat-interval-ms", "300", "--heartbeat-timeout-ms", "3000"],
      {},
      { netns: seg, keepDir: true },
    );
    c = coordinatorClients(coord.socket);
    for (const [i, a] of agents.entries())
      await c.agents.registerAgent({ agentId: `h${i + 1}`, agent: { address: a.address } });
    await c.tree.createNode({ nodeId: "acme", node: { policy: { maxVms: 4, maxMemoryBytes: 1024n * MIB } } });
  }, 120_000);

  afterAll(async () => {
    for (const p of pings) await p.stop().catch(() => undefined);
    for (const a of agents) await a.stop(); // kills their QEMUs too
    await coord?.stop();
    if (coord) await rm(coord.dir, { recursive: true, force: true });
    // And with the namespaces every bridge, tap, veth and nft table of the test.
    for (const ns of [seg, nsA, nsB]) await run("ip", ["netns", "del", ns]);
  });

  const uptime = async (a: RunningAgent, vm: string) => {
    await until(() => agentClients(a).vms.getVm({ name: vm }), isReady, 90_000, `${vm} ready`);
    const m = await consoleRun(clients(a.socket), vm, "cat /proc/uptime", /\n(\d+\.\d+) \d+\.\d+/, 30_000);
    return Number(m[1]);
  };
  const reachable = async (addr: string) =>
    (await inNs(seg, "ping", ["-n", "-c", "1", "-W", "1", addr])).code === 0;

  it("moves a running two-VM environment with NICs: pings across the move lose at most a few replies, uptime and addresses are kept; a new guest gets a free address of the segment", async () => {
    const member = async (id: string) => ({
      ...(await guestMember(id, "")),
      placement: { agent: "agents/h1" },
    });
    const withNic = async (id: string) => {
      const m = await member(id);
      (m.spec as { nics?: unknown[] }).nics = [{ id: "eth0", network: "networks/lan" }];
      return m;
    };
    const created = await succeeded(
      c,
      c.envs.createEnvironment({
        environmentId: "net",
        environment: { node: "nodes/acme", members: [await withNic("web-1"), await withNic("web-2")] },
        start: true,
      }),
    );
    const [a, b] = agents as [RunningAgent, RunningAgent];
    const addrOf = async (vm: string) =>
      (await agentClients(a).vms.getVm({ name: vm })).spec?.nics[0]?.ipAddress ?? "";
    const addrs = [await addrOf("vms/net-web-1"), await addrOf("vms/net-web-2")];
    // The coordinator chose them (the router, .1, is the gateway), and the member's spec shows them.
    expect(addrs).toEqual([`${lan}.2`, `${lan}.3`]);
    expect(envOf(created).members.map((m) => m.spec?.nics[0]?.ipAddress)).toEqual(addrs);
    expect(envOf(created).members.map((m) => m.agent)).toEqual(["agents/h1", "agents/h1"]);
    const before = [await uptime(a, "vms/net-web-1"), await uptime(a, "vms/net-web-2")];
    // The guests answer the segment's router through host A's bridge and uplink.
    for (const x of addrs) await until(() => reachable(x), Boolean, 60_000, `${x} to answer pings`);

    const intervalMs = 50;
    pings.push(...addrs.map((x) => pinger(seg, x, intervalMs)));
    await new Promise((r) => setTimeout(r, 1_000));
    const op = await succeeded(
      c,
      c.envs.migrateEnvironment({ name: "environments/net", agent: "agents/h2" }),
    );
    await new Promise((r) => setTimeout(r, 1_500));
    const results = await Promise.all(pings.splice(0).map((p) => p.stop()));

    expect(envOf(op).members.map((m) => [m.id, m.agent, m.state])).toEqual([
      ["web-1", "agents/h2", MemberState.RUNNING],
      ["web-2", "agents/h2", MemberState.RUNNING],
    ]);
    // From the end of QEMU's migration (the guest paused on the source) to the guest started on the
    // destination, as the operation's steps recorded it.
    const ms = (t?: { seconds: bigint; nanos: number }) => (t ? Number(t.seconds) * 1000 + t.nanos / 1e6 : 0);
    for (const m of ["web-1", "web-2"]) {
      const step = (id: string) => op.steps.find((x) => x.id === `${id}.${m}`);
      process.stdout.write(
        `${m}: perform ended → finish started ${Math.round(ms(step("finish")?.startTime) - ms(step("perform")?.endTime))} ms, finish took ${Math.round(ms(step("finish")?.endTime) - ms(step("finish")?.startTime))} ms\n`,
      );
    }
    for (const [i, r] of results.entries()) {
      process.stdout.write(
        `ping ${addrs[i]} across the move: ${r.sent} sent, ${r.received} received, longest gap ${r.longestGapMs} ms\n`,
      );
      expect(r.sent).toBeGreaterThan(20);
      // "At most a few": the guest is unreachable from its pause on the source until the coordinator's
      // finish step starts it on the destination (QEMU announces it there, so the switch learns its new
      // port at once): at most half a second. Measured: 2 to 7 replies, 100 to 300 ms, on a busy
      // machine; 9 to 10 replies and 450 to 500 ms while the coordinator and the agent polled the
      // migration (every 500 and 150 ms) instead of being told of its end.
      expect(r.sent - r.received, r.out.slice(-400)).toBeLessThanOrEqual(10);
      expect(r.longestGapMs).toBeLessThanOrEqual(500);
    }
    // The same guests (no second boot), the same addresses, reached on host B; nothing left on A.
    const after = [await uptime(b, "vms/net-web-1"), await uptime(b, "vms/net-web-2")];
    expect(after[0]).toBeGreaterThan(before[0] as number);
    expect(after[1]).toBeGreaterThan(before[1] as number);
    const addrOnB = async (vm: string) =>
      (await agentClients(b).vms.getVm({ name: vm })).spec?.nics[0]?.ipAddress ?? "";
    expect([await addrOnB("vms/net-web-1"), await addrOnB("vms/net-web-2")]).toEqual(addrs);
    for (const x of addrs) expect(await reachable(x)).toBe(true);
    expect(await vmsOn(a)).toEqual([]);
    expect(await qemusUnder(a.dir)).toEqual([]);
    const portsOn = async (ag: RunningAgent) =>
      (await createDaemonClient(NetworkService, { socket: ag.socket }).listPorts({ parent: "networks/lan" }))
        .ports.length;
    expect([await portsOn(a), await portsOn(b)]).toEqual([0, 2]);
    const placed = async (id: string) =>
      (await c.agents.getAgent({ name: `agents/${id}` })).allocated?.vms ?? 0;
    expect([await placed("h1"), await placed("h2")]).toEqual([0, 2]);
    expect((await c.tree.getNode({ name: "nodes/acme" })).usage?.vms).toBe(2);

    // A new guest on host A, emptied by the move. Left to itself, A would hand out .2 again (free on
    // A since web-1 left); the coordinator gives the segment's next free address, and the new guest
    // reaches web-1 on host B across the segment.
    const solo = await succeeded(
      c,
      c.envs.createEnvironment({
        environmentId: "net2",
        environment: { node: "nodes/acme", members: [await withNic("solo")] },
        start: true,
      }),
    );
    const soloAddr = envOf(solo).members[0]?.spec?.nics[0]?.ipAddress;
    expect(soloAddr).toBe(`${lan}.4`);
    expect(await addrOf("vms/net2-solo")).toBe(soloAddr);
    await uptime(a, "vms/net2-solo");
    await until(() => reachable(soloAddr as string), Boolean, 60_000, `${soloAddr} to answer pings`);
    // The marker is computed by the guest's shell, so the echoed command line does not match it.
    await consoleRun(
      clients(a.socket),
      "vms/net2-solo",
      `ping -c 3 -W 2 ${addrs[0]} >/dev/null && echo peer-ok-$((40+2))`,
      /peer-ok-42/,
      30_000,
    );

    await succeeded(c, c.envs.deleteEnvironment({ name: "environments/net2" }));
    await succeeded(c, c.envs.deleteEnvironment({ name: "environments/net" }));
    expect(await vmsOn(b)).toEqual([]);
    expect(await vmsOn(a)).toEqual([]);
  });
});
