/**
 * The network service on the real host: bridges and taps made with iproute2, read back with `ip -j`.
 * Needs root. Every network id carries a random suffix, and every link the agent makes carries the
 * alias `vmenv:<tag of the test's state dir>:…`, so the cleanup removes exactly what this run made, even
 * when a test fails, and then checks that none of it is left.
 */
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { NetworkService } from "@vmenv/api/agent/v1";
import { ErrorInfoSchema } from "@vmenv/api/google/rpc";
import { createLogger, errorMapperInterceptor } from "@vmenv/rpc";
import { VmenvError } from "@vmenv/rpc/errors";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { NetworkManager } from "../packages/agent/src/network/manager.js";
import { agentTagFor, bridgeNameFor, macFor } from "../packages/agent/src/network/names.js";
import { networkService } from "../packages/agent/src/network/rpc.js";

const run = promisify(execFile);

interface IpLink {
  ifname: string;
  ifalias?: string;
  master?: string;
  flags: string[];
}
const ipJson = async <T>(args: string[]): Promise<T> =>
  JSON.parse((await run("ip", ["-j", ...args])).stdout) as T;
const links = () => ipJson<IpLink[]>(["link", "show"]);
const linkExists = async (name: string) => (await links()).some((l) => l.ifname === name);
const addrsOf = async (dev: string) =>
  (
    await ipJson<{ addr_info: { family: string; local: string; prefixlen: number }[] }[]>([
      "addr",
      "show",
      "dev",
      dev,
    ])
  )
    .flatMap((l) => l.addr_info)
    .filter((a) => a.family === "inet")
    .map((a) => `${a.local}/${a.prefixlen}`);
const slavesOf = async (bridge: string) =>
  (await ipJson<IpLink[]>(["link", "show", "master", bridge])).map((l) => l.ifname).sort();

/** The code and ErrorInfo of a failed call. */
async function failure(
  p: Promise<unknown>,
): Promise<{ code: Code; reason: string; meta: Record<string, string>; message: string }> {
  try {
    await p;
  } catch (e) {
    if (e instanceof VmenvError) {
      const code =
        Code[e.code.replace(/(^|-)([a-z])/g, (_m, _d, c: string) => c.toUpperCase()) as keyof typeof Code];
      return { code, reason: e.reason, meta: { ...e.metadata }, message: e.message };
    }
    const ce = ConnectError.from(e);
    const ei = ce.findDetails(ErrorInfoSchema)[0];
    return { code: ce.code, reason: ei?.reason ?? "", meta: { ...ei?.metadata }, message: ce.rawMessage };
  }
  throw new Error("expected the call to fail");
}

/** A random /24 of 198.18.0.0/15 (the benchmarking range, which hosts do not use). */
function randomSubnets(n: number): string[] {
  const first = randomBytes(2).readUInt16BE() % (512 - n);
  return Array.from({ length: n }, (_, i) => {
    const k = first + i;
    return `198.${18 + (k >> 8)}.${k & 255}.0/24`;
  });
}

describe("network service on real bridges and taps", () => {
  let dir: string;
  let stateDir: string;
  let tag: string;
  let m: NetworkManager;
  let c: ReturnType<typeof createClient<typeof NetworkService>>;
  let suffix: string;
  let nets: string[];
  /** Every link name a test saw the agent make (checked gone at the end). */
  let seen: Set<string>;
  const logger = createLogger("network-test", "silent");

  async function boot() {
    m = new NetworkManager({ stateDir, logger });
    await m.init();
    const b = networkService(m);
    const transport = createRouterTransport(({ service }) => service(NetworkService, b.impl as never), {
      router: { interceptors: [errorMapperInterceptor(logger)] },
    });
    c = createClient(NetworkService, transport);
  }

  const id = (base: string) => `${base}-${suffix}`;
  const createNet = async (
    base: string,
    cidr: string,
    extra: { gateway?: string; bridgeName?: string } = {},
  ) => {
    const n = await c.createNetwork({ networkId: id(base), network: { cidr, ...extra } });
    seen.add(n.bridgeName);
    return n;
  };

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), "vmenv-net-"));
    stateDir = join(dir, "state");
    tag = agentTagFor(stateDir);
    suffix = randomBytes(3).toString("hex");
    nets = randomSubnets(3);
    seen = new Set();
    await boot();
  });

  afterEach(async () => {
    // Remove every link of this run: the agent's mark proves it (taps before bridges).
    const ours = (await links()).filter((l) => l.ifalias?.startsWith(`vmenv:${tag}:`) || seen.has(l.ifname));
    ours.sort((a, b) => (a.ifname.startsWith("vmt-") ? -1 : 0) - (b.ifname.startsWith("vmt-") ? -1 : 0));
    for (const l of ours) await run("ip", ["link", "del", "dev", l.ifname]).catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
    const left = (await links()).filter((l) => l.ifalias?.startsWith(`vmenv:${tag}:`) || seen.has(l.ifname));
    expect(left.map((l) => l.ifname)).toEqual([]);
  });

  it("creates a bridge with its gateway, allocates ports on real taps, and survives a restart", async () => {
    const [cidr] = nets as [string];
    const net = await createNet("lan", cidr);
    expect(net.name).toBe(`networks/${id("lan")}`);
    expect(net.bridgeName).toBe(bridgeNameFor(id("lan")));
    expect(net.bridgeName.length).toBeLessThanOrEqual(15);
    const gw = cidr.replace(/0\/24$/, "1");
    expect(net.gateway).toBe(gw);
    expect(await addrsOf(net.bridgeName)).toEqual([`${gw}/24`]);

    // The same create again: the same network; another spec: ALREADY_EXISTS.
    expect((await createNet("lan", cidr)).createTime).toEqual(net.createTime);
    expect(
      (await failure(c.createNetwork({ networkId: id("lan"), network: { cidr, mtu: 9000 } }))).code,
    ).toBe(Code.AlreadyExists);

    const a = await m.allocate(net.name, "vms/web-1", "eth0", {});
    const b = await m.allocate(id("lan"), "web-2", "eth0", {});
    seen.add(a.tap).add(b.tap);
    expect(a.port).toBe(`${net.name}/ports/web-1-eth0`);
    expect(a.ip).not.toBe(b.ip);
    expect([a.ip, b.ip]).not.toContain(gw);
    expect(a).toMatchObject({ prefix: 24, gateway: gw, mac: macFor("web-1", "eth0") });
    expect(b.mac).toBe(macFor("web-2", "eth0"));
    expect(a.mac).not.toBe(b.mac);
    expect(a.tap.length).toBeLessThanOrEqual(15);
    expect(await slavesOf(net.bridgeName)).toEqual([a.tap, b.tap].sort());
    for (const t of [a.tap, b.tap]) {
      const [l] = await ipJson<IpLink[]>(["link", "show", "dev", t]);
      expect(l?.flags).toContain("UP");
    }
    // Allocating the same NIC again returns the same port; asking it for another address is refused.
    expect(await m.allocate(net.name, "web-1", "eth0", {})).toEqual(a);
    expect((await failure(m.allocate(net.name, "web-1", "eth0", { ip: b.ip }))).code).toBe(
      Code.AlreadyExists,
    );
    // A wanted address that another port has is refused, naming the port.
    const taken = await failure(m.allocate(net.name, "web-3", "eth0", { ip: a.ip }));
    expect(taken).toMatchObject({ code: Code.FailedPrecondition, reason: "IP_ADDRESS_IN_USE" });
    expect(taken.meta.port).toBe(a.port);

    const ports = await c.listPorts({ parent: net.name });
    expect(ports.ports.map((p) => [p.name, p.active, p.ipAddress])).toEqual([
      [a.port, true, a.ip],
      [b.port, true, b.ip],
    ]);
    expect((await c.getPort({ name: a.port })).macAddress).toBe(a.mac);
    expect((await c.listPorts({ parent: "networks/-", vm: "vms/web-2" })).ports.map((p) => p.name)).toEqual([
      b.port,
    ]);
    expect((await c.getNetwork({ name: net.name })).portCount).toBe(2);

    // Simulated agent restart: a new manager on the same state dir sees the same ports, hands out a new
    // address, and re-creates a tap that went missing meanwhile.
    await run("ip", ["link", "del", "dev", b.tap]);
    await boot();
    expect(
      (await c.listPorts({ parent: net.name })).ports.map((p) => [
        p.name,
        p.ipAddress,
        p.macAddress,
        p.active,
      ]),
    ).toEqual([
      [a.port, a.ip, a.mac, true],
      [b.port, b.ip, b.mac, true],
    ]);
    expect(await slavesOf(net.bridgeName)).toEqual([a.tap, b.tap].sort());
    const d = await m.allocate(net.name, "web-4", "eth1", {});
    seen.add(d.tap);
    expect([a.ip, b.ip, gw]).not.toContain(d.ip);

    // Delete with ports: refused naming a port; after releasing them, the bridge goes.
    const busy = await failure(c.deleteNetwork({ name: net.name }));
    expect(busy).toMatchObject({ code: Code.FailedPrecondition, reason: "NETWORK_IN_USE" });
    expect(busy.meta.port).toMatch(new RegExp(`^${net.name}/ports/`));
    for (const [vm, nic] of [
      ["web-1", "eth0"],
      ["web-2", "eth0"],
      ["web-4", "eth1"],
    ] as const)
      await m.release(net.name, vm, nic);
    await m.release(net.name, "web-1", "eth0"); // again: a no-op
    expect(await linkExists(a.tap)).toBe(false);
    expect(await slavesOf(net.bridgeName)).toEqual([]);
    // A released address is free again.
    const again = await m.allocate(net.name, "web-5", "eth0", { ip: a.ip });
    seen.add(again.tap);
    await m.release(net.name, "web-5", "eth0");
    await c.deleteNetwork({ name: net.name });
    expect(await linkExists(net.bridgeName)).toBe(false);
    expect((await failure(c.getNetwork({ name: net.name }))).code).toBe(Code.NotFound);
    await c.deleteNetwork({ name: net.name, allowMissing: true });
  });

  it("refuses overlapping CIDRs and bridge names that are not its own", async () => {
    const [c1, c2] = nets as [string, string];
    const one = await createNet("one", c1);
    const wider = c1.replace(/\.\d+\.0\/24$/, ".0.0/16");
    const o = await failure(c.createNetwork({ networkId: id("two"), network: { cidr: wider } }));
    expect(o).toMatchObject({ code: Code.FailedPrecondition, reason: "CIDR_OVERLAP" });
    expect(o.meta.other_network).toBe(one.name);
    expect(o.message).toContain(one.name);

    // A bridge made by someone else under the name asked for.
    const foreign = `vme-x${suffix}`;
    seen.add(foreign);
    await run("ip", ["link", "add", "name", foreign, "type", "bridge"]);
    const f = await failure(
      c.createNetwork({ networkId: id("two"), network: { cidr: c2, bridgeName: foreign } }),
    );
    expect(f).toMatchObject({ code: Code.FailedPrecondition, reason: "BRIDGE_NAME_TAKEN" });
    expect(await linkExists(foreign)).toBe(true); // left alone
    expect(await addrsOf(foreign)).toEqual([]);
    expect((await c.listNetworks({})).networks.map((n) => n.name)).toEqual([one.name]);
    await run("ip", ["link", "del", "dev", foreign]);
    await c.deleteNetwork({ name: one.name });
  });

  it("refuses bad input with clear errors and leaves nothing on the host", async () => {
    const [cidr] = nets as [string];
    const before = (await links()).map((l) => l.ifname).sort();
    const bad: [string, Record<string, unknown>, string][] = [
      [id("a"), { cidr: "not-a-cidr" }, "INVALID_CIDR"],
      [id("a"), { cidr: cidr.replace("/24", "/31") }, "INVALID_CIDR"],
      [id("a"), { cidr: cidr.replace(".0/24", ".1/32") }, "INVALID_CIDR"],
      [id("a"), { cidr: "10.0.0.7/24" }, "INVALID_CIDR"],
      ["../etc", { cidr }, "INVALID_NETWORK_ID"],
      ["a;rm -rf /", { cidr }, "INVALID_NETWORK_ID"],
      ["$(reboot)", { cidr }, "INVALID_NETWORK_ID"],
      [id("a"), { cidr, gateway: "203.0.113.1" }, "IP_ADDRESS_OUTSIDE_CIDR"],
      [id("a"), { cidr, bridgeName: "br0;reboot" }, "INVALID_INTERFACE_NAME"],
      [id("a"), { cidr, bridgeName: "a-name-far-too-long" }, "INVALID_INTERFACE_NAME"],
      [id("a"), { cidr, allowedPeers: ["networks/../x"] }, "INVALID_NETWORK_ID"],
    ];
    for (const [networkId, network, reason] of bad) {
      const e = await failure(c.createNetwork({ networkId, network }));
      expect([networkId, e.code, e.reason]).toEqual([networkId, Code.InvalidArgument, reason]);
    }
    expect((await failure(c.getNetwork({ name: "networks/../../etc" }))).code).toBe(Code.InvalidArgument);
    expect((await failure(c.getPort({ name: "networks/x/ports/a;b" }))).code).toBe(Code.InvalidArgument);

    const net = await createNet("b", cidr);
    for (const [vm, nic, want, reason] of [
      ["../x", "eth0", {}, "INVALID_VM_ID"],
      ["vm", "eth0;id", {}, "INVALID_NIC_ID"],
      ["vm", "eth0", { mac: "zz:00" }, "INVALID_MAC_ADDRESS"],
      ["vm", "eth0", { ip: "1.2.3.4" }, "IP_ADDRESS_OUTSIDE_CIDR"],
      ["vm", "eth0", { ip: net.gateway }, "IP_ADDRESS_IS_GATEWAY"],
    ] as const) {
      const e = await failure(m.allocate(net.name, vm, nic, want));
      expect([vm, nic, e.code, e.reason]).toEqual([vm, nic, Code.InvalidArgument, reason]);
    }
    expect((await failure(m.allocate(`networks/${id("nope")}`, "vm", "eth0", {}))).code).toBe(Code.NotFound);
    await c.deleteNetwork({ name: net.name });
    expect((await links()).map((l) => l.ifname).sort()).toEqual(before.filter((n) => !seen.has(n)));
    expect((await links()).filter((l) => l.ifalias?.startsWith(`vmenv:${tag}:`))).toEqual([]);
  });

  it("cleans up what a crashed half-creation left, and only its own links", async () => {
    const [c1, c2] = nets as [string, string];
    const net = await createNet("crash", c1);
    const p = await m.allocate(net.name, "vm-a", "eth0", {});
    seen.add(p.tap);
    // A crash while creating a second port: its record says `creating`, its tap exists without a mark.
    const recordPath = join(stateDir, "networks", `${id("crash")}.json`);
    const doc = JSON.parse(await readFile(recordPath, "utf8"));
    const half = {
      ...doc.ports[0],
      id: "vm-b-eth0",
      vm: "vm-b",
      tap: `vmt-h${suffix}`,
      ip: "0.0.0.0",
      state: "creating",
    };
    doc.ports.push(half);
    await writeFile(recordPath, JSON.stringify(doc));
    seen.add(half.tap);
    await run("ip", ["tuntap", "add", "dev", half.tap, "mode", "tap"]);
    // A network whose create crashed after the bridge was made.
    const crashed = {
      format: 1,
      network: { ...doc.network, id: id("half"), bridge: `vme-h${suffix}`, cidr: c2, state: "creating" },
      ports: [],
    };
    await writeFile(join(stateDir, "networks", `${id("half")}.json`), JSON.stringify(crashed));
    seen.add(crashed.network.bridge);
    await run("ip", ["link", "add", "name", crashed.network.bridge, "type", "bridge"]);
    // A link of ours that no record knows (marked), and one of someone else's with our prefix (not marked).
    const stray = `vmt-s${suffix}`;
    const foreign = `vmt-f${suffix}`;
    seen.add(stray).add(foreign);
    await run("ip", ["tuntap", "add", "dev", stray, "mode", "tap"]);
    await run("ip", ["link", "set", "dev", stray, "alias", `vmenv:${tag}:networks/gone/ports/x`]);
    await run("ip", ["tuntap", "add", "dev", foreign, "mode", "tap"]);

    await boot();
    expect(await linkExists(half.tap)).toBe(false);
    expect(await linkExists(crashed.network.bridge)).toBe(false);
    expect(await linkExists(stray)).toBe(false);
    expect(await linkExists(foreign)).toBe(true);
    expect(await linkExists(p.tap)).toBe(true);
    expect((await c.listNetworks({})).networks.map((n) => n.name)).toEqual([net.name]);
    expect((await c.listPorts({ parent: net.name })).ports.map((x) => x.name)).toEqual([p.port]);
    await run("ip", ["link", "del", "dev", foreign]);
    await m.release(net.name, "vm-a", "eth0");
    await c.deleteNetwork({ name: net.name });
  });

  it("carries traffic to the gateway and between guests of a network, not across networks", async () => {
    // Guests stand in as network namespaces joined to the bridges by veth pairs (a tap needs a VMM to
    // carry traffic; the VM tests cover that). Isolation between networks holds here because the host
    // does not forward IPv4; on a host that does, the agent records `not-enforced` and this part is skipped.
    const [c1, c2] = nets as [string, string];
    const a = await createNet("ca", c1);
    const b = await createNet("cb", c2);
    const nss: string[] = [];
    const guest = async (net: typeof a, n: number) => {
      const ns = `vmenv-t${suffix}-${n}`;
      const host = `vmv-${suffix}${n}`;
      seen.add(host);
      await run("ip", ["netns", "add", ns]);
      nss.push(ns);
      await run("ip", ["link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns]);
      await run("ip", ["link", "set", "dev", host, "master", net.bridgeName, "up"]);
      const ip = net.cidr.replace(/0\/24$/, String(10 + n));
      await run("ip", ["-n", ns, "addr", "add", `${ip}/24`, "dev", "eth0"]);
      await run("ip", ["-n", ns, "link", "set", "dev", "eth0", "up"]);
      await run("ip", ["-n", ns, "route", "add", "default", "via", net.gateway]);
      return { ns, ip };
    };
    // Whether a TCP SYN from `ns` to `to` is answered (a refusal is an answer: the address is reachable).
    // There is no ping on these hosts; node is.
    const probe =
      "const s=require('node:net').connect({host:process.argv[1],port:9,timeout:1500});" +
      "s.on('connect',()=>process.exit(0));s.on('timeout',()=>process.exit(1));" +
      "s.on('error',e=>process.exit(e.code==='ECONNREFUSED'?0:1));";
    const ping = (ns: string, to: string) =>
      run("ip", ["netns", "exec", ns, process.execPath, "-e", probe, to]).then(
        () => true,
        () => false,
      );
    try {
      const g1 = await guest(a, 1);
      const g2 = await guest(a, 2);
      const g3 = await guest(b, 3);
      expect(await ping(g1.ns, a.gateway)).toBe(true);
      expect(await ping(g1.ns, g2.ip)).toBe(true);
      const rec = JSON.parse(await readFile(join(stateDir, "networks", `${id("ca")}.json`), "utf8"));
      if (rec.network.isolation === "no-forwarding" || rec.network.isolation === "nftables") {
        expect(await ping(g1.ns, g3.ip)).toBe(false);
        expect(await ping(g3.ns, g1.ip)).toBe(false);
      }
    } finally {
      for (const ns of nss) await run("ip", ["netns", "del", ns]).catch(() => undefined);
      for (const n of [1, 2, 3]) await run("ip", ["link", "del", `vmv-${suffix}${n}`]).catch(() => undefined);
    }
    await c.deleteNetwork({ name: a.name });
    await c.deleteNetwork({ name: b.name });
  });

  it("isolates the ports of a network from one another when asked, with the network's MTU", async () => {
    const [cidr] = nets as [string];
    const net = await c.createNetwork({
      networkId: id("iso"),
      network: { cidr, isolatePorts: true, mtu: 1400 },
    });
    seen.add(net.bridgeName);
    const p = await m.allocate(net.name, "vm-i", "eth0", {});
    seen.add(p.tap);
    expect(p.mtu).toBe(1400);
    const [l] = await ipJson<{ mtu: number; linkinfo?: { info_slave_data?: { isolated?: boolean } } }[]>([
      "-d",
      "link",
      "show",
      "dev",
      p.tap,
    ]);
    expect(l?.mtu).toBe(1400);
    expect(l?.linkinfo?.info_slave_data?.isolated).toBe(true);
    await m.release(net.name, "vm-i", "eth0");
    await c.deleteNetwork({ name: net.name });
  });

  it("joins a host interface to a network as its uplink, refuses one it cannot use, and leaves it on delete", async () => {
    const [c1, c2, c3] = nets as [string, string, string];
    // A veth pair stands for the host's interface to the shared segment (deleting one end deletes both).
    const [up, peer] = [`vu-${suffix}a`, `vu-${suffix}b`];
    seen.add(up).add(peer);
    await run("ip", ["link", "add", "name", up, "type", "veth", "peer", "name", peer]);
    const uplinkOf = async () => (await ipJson<IpLink[]>(["link", "show", "dev", up]))[0];

    const net = await c.createNetwork({ networkId: id("seg"), network: { cidr: c1, uplink: up } });
    seen.add(net.bridgeName);
    expect(net.uplink).toBe(up);
    expect(net.gateway).toBe(c1.replace(/0\/24$/, "1"));
    // The gateway is the segment's router: the bridge holds no address, the uplink is its port, up.
    expect(await addrsOf(net.bridgeName)).toEqual([]);
    expect(await uplinkOf()).toMatchObject({ master: net.bridgeName });
    expect((await uplinkOf())?.flags).toContain("UP");
    const port = await m.allocate(net.name, "vm-a", "eth0", {});
    seen.add(port.tap);
    expect(port.gateway).toBe(net.gateway);
    expect(await slavesOf(net.bridgeName)).toEqual([port.tap, up].sort());

    // Refusals: each names the uplink, and none leaves a bridge or a record behind.
    const refusals: [string, Record<string, unknown>, Code, string][] = [
      [id("two"), { cidr: c2, uplink: up }, Code.FailedPrecondition, "UPLINK_IN_USE"],
      [id("two"), { cidr: c2, uplink: `vu-${suffix}z` }, Code.FailedPrecondition, "UPLINK_NOT_FOUND"],
      [id("two"), { cidr: c2, uplink: "lo" }, Code.FailedPrecondition, "UPLINK_UNUSABLE"],
      [id("two"), { cidr: c2, uplink: net.bridgeName }, Code.InvalidArgument, "INVALID_ARGUMENT"],
      [id("two"), { cidr: c2, uplink: "eth0;reboot" }, Code.InvalidArgument, "INVALID_INTERFACE_NAME"],
      [id("two"), { cidr: c2, uplink: peer, vlanId: 7 }, Code.Unimplemented, "NOT_IMPLEMENTED"],
      [id("two"), { cidr: c2, vlanId: 7 }, Code.InvalidArgument, "INVALID_ARGUMENT"],
    ];
    for (const [networkId, network, code, reason] of refusals) {
      const e = await failure(c.createNetwork({ networkId, network }));
      expect([network.uplink, e.code, e.reason]).toEqual([network.uplink, code, reason]);
      if (network.uplink && code === Code.FailedPrecondition) expect(e.meta.uplink).toBe(network.uplink);
    }
    // An interface with an address would be cut off by joining a bridge: refused, and it keeps it.
    await run("ip", ["addr", "add", c3.replace(/0\/24$/, "9/24"), "dev", peer]);
    const addressed = await failure(
      c.createNetwork({ networkId: id("two"), network: { cidr: c2, uplink: peer } }),
    );
    expect(addressed).toMatchObject({ code: Code.FailedPrecondition, reason: "UPLINK_UNUSABLE" });
    expect(addressed.message).toContain("IPv4 addresses");
    expect(await addrsOf(peer)).toEqual([c3.replace(/0\/24$/, "9/24")]);
    expect(await linkExists(bridgeNameFor(id("two")))).toBe(false);
    expect((await c.listNetworks({})).networks.map((n) => n.name)).toEqual([net.name]);

    // Restart: an uplink taken off the bridge meanwhile is joined again.
    await run("ip", ["link", "set", "dev", up, "nomaster"]);
    await boot();
    expect(await uplinkOf()).toMatchObject({ master: net.bridgeName });
    expect((await c.getNetwork({ name: net.name })).uplink).toBe(up);

    // Delete: the bridge goes, the host's interface stays, out of any bridge.
    await m.release(net.name, "vm-a", "eth0");
    await c.deleteNetwork({ name: net.name });
    expect(await linkExists(net.bridgeName)).toBe(false);
    expect(await uplinkOf()).toBeDefined();
    expect((await uplinkOf())?.master).toBeUndefined();
  });

  it("paginates networks", async () => {
    for (const [i, cidr] of nets.entries()) await createNet(`p${i}`, cidr);
    const first = await c.listNetworks({ pageSize: 2 });
    expect(first.networks.map((n) => n.name)).toEqual([`networks/${id("p0")}`, `networks/${id("p1")}`]);
    const second = await c.listNetworks({ pageSize: 2, pageToken: first.nextPageToken });
    expect(second.networks.map((n) => n.name)).toEqual([`networks/${id("p2")}`]);
    expect(second.nextPageToken).toBe("");
    for (const n of [...first.networks, ...second.networks]) await c.deleteNetwork({ name: n.name });
  });
});
