import { NetworkService } from "@vmenv/api/agent/v1";
import { createDaemonClient } from "@vmenv/rpc";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type RunningAgent, run, startAgent } from "./support/agent.js";
import { clients, consoleRun, done, guestVm, isReady, until } from "./support/vm.js";

/**
 * The agent runs in a network namespace of its own that routes IPv4 (ip_forward=1 there, not on the
 * host): without the agent's nftables rules, guests on different networks would reach each other
 * through the gateways. Everything (bridges, taps, QEMU's netdevs, the nft table) lives in that
 * namespace, which is deleted at the end.
 */
describe("network isolation with nftables on a host that forwards (real guests, TCG)", () => {
  const suffix = Math.random().toString(36).slice(2, 7);
  const ns = `vmenv-iso-${suffix}`;
  const third = () => Math.floor(Math.random() * 250) + 2;
  const [lan, other, peer] = [`10.71.${third()}`, `10.72.${third()}`, `10.73.${third()}`];
  let agent: RunningAgent;
  let c: ReturnType<typeof clients>;
  let net: ReturnType<typeof createDaemonClient<typeof NetworkService>>;
  const inNs = (cmd: string, args: string[]) => run("ip", ["netns", "exec", ns, cmd, ...args]);
  const tables = async () => (await inNs("nft", ["list", "tables"])).stdout;

  beforeAll(async () => {
    await run("ip", ["netns", "add", ns]);
    await inNs("ip", ["link", "set", "lo", "up"]);
    await inNs("sysctl", ["-qw", "net.ipv4.ip_forward=1"]);
    agent = await startAgent(["--kvm-probe-timeout-ms", "200"], {}, { netns: ns });
    c = clients(agent.socket);
    net = createDaemonClient(NetworkService, { socket: agent.socket, timeoutMs: 60_000 });
  });
  afterAll(async () => {
    await agent?.stop(); // kills its QEMUs too
    await run("ip", ["netns", "del", ns]); // and with it every link and the nft table
  });

  const nicVm = async (id: string, network: string) => {
    const req = await guestVm(id);
    (req.vm.spec as { nics?: unknown[] }).nics = [{ id: "eth0", network: `networks/${network}` }];
    await done(c, await c.vms.createVm(req));
    const vm = await until(() => c.vms.getVm({ name: `vms/${id}` }), isReady, 120_000, `${id} ready`);
    return vm.spec?.nics[0]?.ipAddress ?? "";
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

  it("reaches guests and the gateway of its own network and an allowed peer, never another network, also after an agent restart", async () => {
    await net.createNetwork({ networkId: "lan", network: { cidr: `${lan}.0/24` } });
    await net.createNetwork({ networkId: "other", network: { cidr: `${other}.0/24` } });
    // `peer` may open connections to `lan` (one-way: `lan` does not list it back).
    await net.createNetwork({
      networkId: "peer",
      network: { cidr: `${peer}.0/24`, allowedPeers: ["networks/lan"] },
    });
    expect(await tables()).toMatch(/table inet vmenv-[0-9a-f]{12}/);

    const [a, b, cc, d] = await Promise.all([
      nicVm("a", "lan"),
      nicVm("b", "lan"),
      nicVm("c", "other"),
      nicVm("d", "peer"),
    ]);
    // Same network, and the host gateway: reached.
    expect(await ping("a", b)).toBe("OK");
    expect(await ping("b", a)).toBe("OK");
    expect(await ping("a", `${lan}.1`)).toBe("OK");
    expect(await ping("c", `${other}.1`)).toBe("OK");
    // Another network, though the namespace routes between the bridges: dropped both ways.
    expect(await ping("c", a)).toBe("NO");
    expect(await ping("a", cc)).toBe("NO");
    // An allowed peer: `peer` → `lan` yes (replies come back), `lan` → `peer` no, `peer` → `other` no.
    expect(await ping("d", a)).toBe("OK");
    expect(await ping("a", d)).toBe("NO");
    expect(await ping("d", cc)).toBe("NO");

    // kill -9 and a new agent: the rules are still (again) there, the same, and still hold.
    const before = (await inNs("nft", ["list", "ruleset"])).stdout;
    await agent.kill();
    agent = await startAgent(["--kvm-probe-timeout-ms", "200"], {}, { dir: agent.dir, netns: ns });
    c = clients(agent.socket);
    net = createDaemonClient(NetworkService, { socket: agent.socket, timeoutMs: 60_000 });
    expect((await inNs("nft", ["list", "ruleset"])).stdout).toBe(before);
    expect(await ping("c", a)).toBe("NO");
    expect(await ping("a", b)).toBe("OK");

    // Everything deleted: no tap, no bridge, no table.
    for (const vm of ["a", "b", "c", "d"])
      await done(c, await c.vms.deleteVm({ name: `vms/${vm}`, force: true }));
    for (const n of ["lan", "other", "peer"]) await net.deleteNetwork({ name: `networks/${n}` });
    expect(await tables()).not.toMatch(/vmenv-/);
    const links = (await inNs("ip", ["-o", "link"])).stdout;
    expect(links).not.toMatch(/vm[et]-/);
  });
});
