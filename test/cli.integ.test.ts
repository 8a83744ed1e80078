import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { cpus, hostname, tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { bridgeNameFor } from "../packages/agent/src/network/names.js";
import { cliMain, type RunningAgent, repoRoot, run, startAgent } from "./support/agent.js";
import { guestImage } from "./support/guest.js";
import { until } from "./support/vm.js";

const versionOf = (pkg: string) =>
  (JSON.parse(readFileSync(join(repoRoot, "packages", pkg, "package.json"), "utf8")) as { version: string })
    .version;

/** The runner's own VMENV_* variables, unset, so that only what a test passes reaches the CLI. */
const noVmenvEnv: NodeJS.ProcessEnv = Object.fromEntries(
  Object.keys(process.env)
    .filter((k) => k.startsWith("VMENV_"))
    .map((k) => [k, undefined]),
);

/** The host's links, as `ip -j link show` has them. */
const hostLinks = async () =>
  JSON.parse((await run("ip", ["-j", "link", "show"])).stdout) as { ifname: string; mtu: number }[];

/**
 * The first three octets of `n` adjacent random /24s of 198.18.0.0/15 (benchmarking space, routed
 * nowhere), so that parallel runs do not meet.
 */
function randomSubnets(n: number): string[] {
  const first = randomBytes(2).readUInt16BE() % (512 - n);
  return Array.from({ length: n }, (_, i) => `198.${18 + ((first + i) >> 8)}.${(first + i) & 255}`);
}

/** Runs `vmenv ...args` as a user would (never through a shell). */
const vmenv = (args: string[], env: NodeJS.ProcessEnv = {}) =>
  run(process.execPath, [cliMain, ...args], { env: { ...noVmenvEnv, ...env }, timeoutMs: 30_000 });

describe("vmenv CLI against a real agent", () => {
  let agent: RunningAgent;
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "vmenv-cli-test-"));
    agent = await startAgent();
  });
  afterAll(async () => {
    await agent?.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it("host info prints the host, its NUMA nodes and the TCG accelerator as a table", async () => {
    const r = await vmenv(["--socket", agent.socket, "host", "info"]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(
      new RegExp(`^Host:\\s+${hostname().replace(/[.*+?^${}()|[\]\\]/g, "\\$&")} \\(`, "m"),
    );
    expect(r.stdout).toMatch(/^Accelerator:\s+tcg \(for new VMs\)$/m);
    expect(r.stdout).toMatch(/^NUMA\s+CPUS\s+MEMORY\s+FREE\s+HUGEPAGES$/m);
    expect(r.stdout).toMatch(/^ACCELERATOR\s+PRESENT\s+USABLE\s+PROBE$/m);
    // The agent probed TCG with a real guest (the integ project needs QEMU).
    expect(r.stdout).toMatch(/^tcg\s+yes\s+yes\s+\S/m);
  });

  it("host info -o json is the HostInfo message in proto JSON", async () => {
    const r = await vmenv(["--socket", agent.socket, "-o", "json", "host", "info"]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    const j = JSON.parse(r.stdout) as {
      hostname: string;
      cpu: { threads: number };
      memory: { totalBytes: string };
      numaNodes: { cpus: number[] }[];
      effectiveAccelerator: string;
      agentVersion: string;
    };
    expect(j.hostname).toBe(hostname());
    // The agent counts online CPUs from sysfs; Node counts them from /proc: the same CPUs.
    expect(j.cpu.threads).toBe(cpus().length);
    expect(j.numaNodes.flatMap((n) => n.cpus)).toHaveLength(cpus().length);
    expect(j.effectiveAccelerator).toBe("ACCELERATOR_KIND_TCG");
    expect(j.memory.totalBytes).toMatch(/^[1-9]\d*$/); // 64-bit sizes are strings in proto JSON
    expect(j.agentVersion).toBe(versionOf("agent"));
  });

  it("version over TCP names the CLI's and the agent's versions", async () => {
    const r = await vmenv(["--address", agent.address, "version"]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(`vmenv ${versionOf("cli")}\nvmenv-agent ${versionOf("agent")} on ${hostname()}\n`);
  });

  it("takes the socket from VMENV_SOCKET, and --socket wins over it", async () => {
    const r = await vmenv(["-o", "json", "version"], { VMENV_SOCKET: agent.socket });
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({
      client: versionOf("cli"),
      agent: versionOf("agent"),
      host: hostname(),
    });
    const nope = join(dir, "nope.sock");
    const overridden = await vmenv(["--socket", nope, "version"], { VMENV_SOCKET: agent.socket });
    expect(overridden.code).not.toBe(0);
    expect(overridden.stderr).toContain(nope);
  });

  it("explains in one line on stderr that nothing listens on a missing socket", async () => {
    const nope = join(dir, "nope.sock");
    const r = await vmenv(["--socket", nope, "host", "info"]);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe("");
    expect(r.stderr).toBe(`vmenv: UNAVAILABLE: cannot reach unix:${nope}: no such socket\n`);
  });

  it("refuses an unknown output format as a usage error naming the choices", async () => {
    const r = await vmenv(["--socket", agent.socket, "--output", "yaml", "host", "info"]);
    expect(r.code).not.toBe(0);
    expect(r.stdout).toBe("");
    expect(r.stderr).toContain("argument 'yaml' is invalid. Allowed choices are table, json.");
  });

  it("refuses --tls-* flags without --address with one clear line", async () => {
    const r = await vmenv(["--socket", agent.socket, "--tls-ca", "x", "host", "info"]);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe("");
    expect(r.stderr).toBe("vmenv: --tls* flags need --address (the Unix socket has no TLS)\n");
  });

  it("drives a VM's life: create, list, get, console, snapshot, stop, delete", async () => {
    const { kernel, initrd } = await guestImage();
    const sock = ["--socket", agent.socket];
    const create = await vmenv([
      ...sock,
      "vm",
      "create",
      "cli1",
      "--kernel",
      kernel,
      "--initrd",
      initrd,
      "--cmdline",
      "console=ttyS0 quiet vmenv.hostname=cli1",
      "--memory",
      "192M",
    ]);
    expect(create.stderr).toBe("");
    expect(create.stdout).toMatch(/^Name:\s+vms\/cli1$/m);
    expect(create.stdout).toMatch(/^State:\s+running/m);
    const list = await vmenv([...sock, "vm", "list"]);
    expect(list.stdout).toMatch(/^NAME\s+STATE\s+VCPUS\s+MEMORY\s+PID\s+UP\s+READY$/m);
    expect(list.stdout).toMatch(/^cli1\s+running\s+1\s+192\.0 MiB\s+\d+/m);
    await until(
      async () => (await vmenv([...sock, "-o", "json", "vm", "get", "cli1"])).stdout,
      (o) => o.includes("guestReadyTime"),
      90_000,
      "ready",
    );
    const console = await vmenv([...sock, "vm", "console", "cli1", "-n", "200"]);
    expect(console.stdout).toMatch(/VMENV-GUEST-READY hostname=cli1/);
    const snap = await vmenv([...sock, "vm", "snapshot", "cli1", "before"]);
    expect(snap.code).toBe(0);
    expect((await vmenv([...sock, "vm", "snapshots", "cli1"])).stdout).toMatch(/^before\s+running\s+\d/m);
    const del = await vmenv([...sock, "vm", "delete", "cli1"]);
    expect(del.code).toBe(1);
    expect(del.stderr.trim()).toBe(
      "vmenv: FAILED_PRECONDITION: vms/cli1 is running: stop it first, or delete with force (reason VM_RUNNING, vm=vms/cli1)",
    );
    expect((await vmenv([...sock, "vm", "stop", "cli1", "--force"])).stdout).toMatch(/^State:\s+stopped/m);
    expect((await vmenv([...sock, "vm", "delete", "cli1"])).code).toBe(0);
    expect((await vmenv([...sock, "vm", "list"])).stdout.trim()).toBe(
      "NAME  STATE  VCPUS  MEMORY  PID  UP  READY",
    );
  });

  it("creates, lists, gets and deletes a network, showing its ports and the agent's refusals", async () => {
    const sock = ["--socket", agent.socket];
    const id = `cli-${randomBytes(4).toString("hex")}`;
    const bridge = bridgeNameFor(id);
    const [net, other] = randomSubnets(2);
    try {
      const create = await vmenv([
        ...sock,
        "network",
        "create",
        id,
        "--cidr",
        `${net}.0/24`,
        "--mtu",
        "1400",
        "--isolate-ports",
        "--allow-peer",
        `${id}-peer`,
        "--label",
        "tenant=acme",
      ]);
      expect(create.stderr).toBe("");
      expect(create.code).toBe(0);
      expect(create.stdout).toMatch(new RegExp(`^Name:\\s+networks/${id}$`, "m"));
      expect(create.stdout).toMatch(new RegExp(`^Bridge:\\s+${bridge}$`, "m"));
      expect(create.stdout).toMatch(new RegExp(`^Gateway:\\s+${net}\\.1 \\(on the host's bridge\\)$`, "m"));
      expect(create.stdout).toMatch(/^Uplink:\s+none \(local to this host\)$/m);
      expect(create.stdout).toMatch(/^Isolate ports:\s+yes$/m);
      expect(create.stdout).toMatch(new RegExp(`^Allowed peers:\\s+networks/${id}-peer$`, "m"));
      expect(create.stdout).toMatch(/^Labels:\s+tenant=acme$/m);
      expect(create.stdout).toMatch(/^Ports:\s+0$/m);
      // The bridge is real, with the MTU asked for.
      expect((await hostLinks()).find((l) => l.ifname === bridge)?.mtu).toBe(1400);

      const list = await vmenv([...sock, "network", "list"]);
      expect(list.code).toBe(0);
      expect(list.stdout).toMatch(/^NETWORK\s+BRIDGE\s+CIDR\s+GATEWAY\s+UPLINK\s+MTU\s+PORTS\s+FLAGS$/m);
      expect(list.stdout).toMatch(
        new RegExp(
          `^${id}\\s+${bridge}\\s+${net}\\.0/24\\s+${net}\\.1\\s+-\\s+1400\\s+0\\s+isolate-ports peers=${id}-peer$`,
          "m",
        ),
      );
      const json = await vmenv([...sock, "-o", "json", "network", "list"]);
      expect(json.code).toBe(0);
      const { networks } = JSON.parse(json.stdout) as { networks: Record<string, unknown>[] };
      expect(networks.find((n) => n.name === `networks/${id}`)).toMatchObject({
        bridgeName: bridge,
        cidr: `${net}.0/24`,
        gateway: `${net}.1`,
        mtu: 1400,
        isolatePorts: true,
        allowedPeers: [`networks/${id}-peer`],
        labels: { tenant: "acme" },
      });

      // Either form of the name; the detail matches what create printed.
      const get = await vmenv([...sock, "network", "get", `networks/${id}`]);
      expect(get.code).toBe(0);
      expect(get.stdout).toBe(create.stdout);

      const ports = await vmenv([...sock, "network", "ports", id]);
      expect(ports.code).toBe(0);
      expect(ports.stdout.trim()).toBe("NETWORK  PORT  VM  NIC  TAP  MAC  ADDRESS  ACTIVE");
      const all = await vmenv([...sock, "-o", "json", "network", "ports"]);
      expect(all.code).toBe(0);
      expect(JSON.parse(all.stdout)).toEqual({ ports: [] });

      // Bad input is the agent's to judge; the user sees its error in one line and a failing exit.
      const refused = await vmenv([
        ...sock,
        "network",
        "create",
        `${id}-up`,
        "--cidr",
        `${other}.0/24`,
        "--uplink",
        "vmenv-nope0",
      ]);
      expect(refused.code).toBe(1);
      expect(refused.stdout).toBe("");
      expect(refused.stderr).toBe(
        `vmenv: FAILED_PRECONDITION: uplink vmenv-nope0 is not an interface of this host (reason UPLINK_NOT_FOUND, uplink=vmenv-nope0, network=networks/${id}-up)\n`,
      );
      expect((await hostLinks()).map((l) => l.ifname)).not.toContain(bridgeNameFor(`${id}-up`));
      const badMtu = await vmenv([
        ...sock,
        "network",
        "create",
        `${id}-mtu`,
        "--cidr",
        "10.0.0.0/24",
        "--mtu",
        "big",
      ]);
      expect(badMtu.code).not.toBe(0);
      expect(badMtu.stderr).toContain("option '--mtu <n>' argument 'big' is invalid. not a number.");

      const del = await vmenv([...sock, "network", "delete", id]);
      expect(del.stderr).toBe("");
      expect(del.code).toBe(0);
      expect(del.stdout).toBe(`deleted networks/${id}\n`);
      expect((await hostLinks()).map((l) => l.ifname)).not.toContain(bridge);
      const gone = await vmenv([...sock, "network", "get", id]);
      expect(gone.code).toBe(1);
      expect(gone.stderr).toMatch(/^vmenv: NOT_FOUND: .*\(reason NETWORK_NOT_FOUND/);
      expect((await vmenv([...sock, "network", "delete", id])).code).toBe(1);
      expect((await vmenv([...sock, "network", "delete", id, "--allow-missing"])).code).toBe(0);
    } finally {
      await vmenv([...sock, "network", "delete", id, "--allow-missing"]);
    }
  });
});
