import { readFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { cpus, hostname, tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { cliMain, type RunningAgent, repoRoot, run, startAgent } from "./support/agent.js";

const versionOf = (pkg: string) =>
  (JSON.parse(readFileSync(join(repoRoot, "packages", pkg, "package.json"), "utf8")) as { version: string })
    .version;

/** The runner's own VMENV_* variables, unset, so that only what a test passes reaches the CLI. */
const noVmenvEnv: NodeJS.ProcessEnv = Object.fromEntries(
  Object.keys(process.env)
    .filter((k) => k.startsWith("VMENV_"))
    .map((k) => [k, undefined]),
);

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
});
