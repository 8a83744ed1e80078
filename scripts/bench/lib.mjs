// What the benchmarks that drive a real vmenv-agent share: running commands, the test guest, starting and
// tearing down an agent, creating guests, and a process's CPU time from /proc.
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { rm } from "node:fs/promises";
import { join, resolve } from "node:path";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { OperationState } from "@vmenv/api/agent/v1";
import {
  AgentService,
  AgentState,
  OperationState as CoordOpState,
  EnvironmentService,
  OperationService,
  ResourceService,
} from "@vmenv/api/coordinator/v1";
import { createDaemonClient } from "@vmenv/rpc";

export const root = resolve(import.meta.dirname, "../..");
export const MIB = 1024n * 1024n;

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
export const escapeRe = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/** Runs a command with arguments (never through a shell). */
export function run(cmd, args, timeoutMs = 60_000) {
  return new Promise((res, rej) => {
    const p = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    p.stdout.setEncoding("utf8").on("data", (d) => (stdout += d));
    p.stderr.setEncoding("utf8").on("data", (d) => (stderr += d));
    const t = setTimeout(() => p.kill("SIGKILL"), timeoutMs);
    p.once("error", rej);
    p.once("close", (code) => {
      clearTimeout(t);
      res({ code, stdout, stderr });
    });
  });
}

/** SIGKILLs every process whose command line matches `pattern` (pgrep -f), until none is left. */
export async function killMatching(pattern) {
  for (let i = 0; i < 50; i++) {
    const pids = (await run("pgrep", ["-f", pattern])).stdout
      .split("\n")
      .filter(Boolean)
      .map(Number)
      .filter((p) => p !== process.pid);
    if (pids.length === 0) return;
    for (const p of pids) {
      try {
        process.kill(p, "SIGKILL");
      } catch {
        // already gone
      }
    }
    await sleep(100);
  }
}

/** CPU time of a process in clock ticks: its own (utime+stime) and its reaped children's (cutime+cstime). */
export function cpuTicks(pid) {
  const stat = readFileSync(`/proc/${pid}/stat`, "latin1");
  // Fields after "pid (comm) ": state is field 3, utime 14, stime 15, cutime 16, cstime 17.
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return { self: Number(f[11]) + Number(f[12]), children: Number(f[13]) + Number(f[14]) };
}

export const clkTck = Number((await run("getconf", ["CLK_TCK"])).stdout.trim()) || 100;
export const ticksToMs = (t) => (t * 1000) / clkTck;

/** The test guest's kernel and initrd (scripts/guest-image builds and caches them). */
export async function guestImage() {
  const r = await run(join(root, "scripts/guest-image"), [], 600_000);
  const kernel = /^kernel=(.+)$/m.exec(r.stdout)?.[1];
  const initrd = /^initrd=(.+)$/m.exec(r.stdout)?.[1];
  if (r.code !== 0 || !kernel || !initrd)
    throw new Error(`scripts/guest-image failed (${r.code}):\n${r.stdout}\n${r.stderr}`);
  return { kernel, initrd };
}

/**
 * Starts `node <main> ...args` (a vmenv daemon: `name` is its process name, e.g. "vmenv-agent"). `ready`
 * resolves with its log so far once it logs "<name> ready" (rejects if it exits or takes over 30 s);
 * `exited` resolves with its exit code or signal; `log()` is its stderr so far (the last 100 kB once it
 * passes 1 MB).
 */
function startDaemon(name, main, args) {
  const proc = spawn(process.execPath, [join(root, main), ...args], { stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  const exited = new Promise((r) => proc.once("exit", (c, s) => r(c ?? s)));
  const ready = new Promise((res, rej) => {
    proc.stderr.setEncoding("utf8").on("data", (d) => {
      log += d;
      if (log.includes(`"msg":"${name} ready"`)) res(log);
      if (log.length > 1e6) log = log.slice(-1e5);
    });
    void exited.then((c) => rej(new Error(`${name} exited (${c}): ${log}`)));
    setTimeout(() => rej(new Error(`${name} not ready after 30s: ${log}`)), 30_000).unref();
  });
  return { proc, ready, exited, log: () => log };
}

/**
 * Starts packages/agent/dist/main.js under `dir` (TCG, Unix socket only) with `args` added (a later
 * `--listen host:port` wins); see startDaemon for what it returns, plus its `socket`.
 */
export function startAgent(dir, args = []) {
  const socket = join(dir, "agent.sock");
  const flags = ["--state-dir", join(dir, "agent"), "--socket", socket, "--listen", "off"];
  const tcg = ["--accelerator", "tcg", "--kvm-probe-timeout-ms", "200"];
  return {
    socket,
    ...startDaemon("vmenv-agent", "packages/agent/dist/main.js", [...flags, ...tcg, ...args]),
  };
}

/**
 * Starts packages/coordinator/dist/main.js under `dir` (LevelDB and socket there, TCP on a free loopback
 * port) with `args` added; the same shape as startAgent.
 */
export function startCoordinator(dir, args = []) {
  const socket = join(dir, "coordinator.sock");
  const flags = ["--data-dir", join(dir, "db"), "--socket", socket, "--listen", "127.0.0.1:0"];
  return {
    socket,
    ...startDaemon("vmenv-coordinator", "packages/coordinator/dist/main.js", [...flags, ...args]),
  };
}

/** The TCP address ("host:port") a daemon's ready line reports. */
const tcpAddressOf = (log) => /"tcpAddress":"([^"]+)"/.exec(log)?.[1] ?? "";

/**
 * The run's teardown, done once (later calls get the same promise) and on SIGINT/SIGTERM: `before` (the
 * script's own), then every QEMU and storage daemon naming `dir` (they outlive the agent), the agent
 * (SIGTERM, SIGKILL after 10 s; `agent` may be an array of agents and coordinators, read at teardown so
 * that the script can add to it later), anything else still naming `dir`, and `dir`.
 */
export function teardown(dir, agent, before = async () => undefined) {
  let cleaned;
  const cleanup = () => {
    cleaned ??= (async () => {
      await before();
      await killMatching(`qemu-system.*${escapeRe(dir)}`);
      await killMatching(`qemu-storage-daemon.*${escapeRe(dir)}`);
      await Promise.all(
        [agent].flat().map(async ({ proc, exited }) => {
          if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGTERM");
          const t = setTimeout(() => proc.kill("SIGKILL"), 10_000);
          await exited;
          clearTimeout(t);
        }),
      );
      await killMatching(escapeRe(dir));
      await rm(dir, { recursive: true, force: true });
    })();
    return cleaned;
  };
  for (const sig of ["SIGINT", "SIGTERM"]) {
    process.once(sig, () => {
      console.error(`\n${sig}: cleaning up`);
      void cleanup().finally(() => process.exit(sig === "SIGINT" ? 130 : 143));
    });
  }
  return cleanup;
}

/** A CreateVm request for the test guest: 1 vCPU, direct kernel boot, hostname `id`. */
export function guestVm({ id, kernel, initrd, memoryMib, start = true, disks }) {
  return {
    vmId: id,
    start,
    vm: {
      spec: {
        vcpus: 1,
        memoryBytes: BigInt(memoryMib) * MIB,
        boot: {
          method: {
            case: "directKernel",
            value: {
              kernelPath: kernel,
              initrdPath: initrd,
              cmdline: `console=ttyS0 quiet vmenv.hostname=${id}`,
            },
          },
        },
        ...(disks ? { disks } : {}),
      },
    },
  };
}

/** Waits for an agent operation to end (WaitOperation, `timeoutMs` a call); throws unless it succeeded. */
export async function finished(diag, op, timeoutMs = 60_000) {
  let cur = op;
  while (cur.state === OperationState.RUNNING || cur.state === OperationState.PENDING)
    cur = await diag.waitOperation({ name: op.name, timeout: durationFromMs(timeoutMs) });
  if (cur.state !== OperationState.SUCCEEDED)
    throw new Error(`${cur.kind} ${cur.target}: ${cur.error?.message}`);
  return cur;
}

/** Clients of a coordinator's services (long deadlines: TCG guests are slow). */
export function coordinatorClients(socket) {
  const services = {
    envs: EnvironmentService,
    ops: OperationService,
    tree: ResourceService,
    agents: AgentService,
  };
  const client = (service) => createDaemonClient(service, { socket, timeoutMs: 120_000 });
  return Object.fromEntries(Object.entries(services).map(([k, service]) => [k, client(service)]));
}

/** Waits for a coordinator operation to end (WaitOperation, `timeoutMs` a call); throws unless it succeeded. */
export async function coordFinished(c, op, timeoutMs = 60_000) {
  let cur = op;
  while ([CoordOpState.PENDING, CoordOpState.RUNNING, CoordOpState.ROLLING_BACK].includes(cur.state))
    cur = await c.ops.waitOperation({ name: op.name, timeout: durationFromMs(timeoutMs) });
  if (cur.state !== CoordOpState.SUCCEEDED)
    throw new Error(`${cur.kind} ${cur.target} ended ${CoordOpState[cur.state]}: ${cur.error?.message}`);
  return cur;
}

/** Registers agents (each `{ name, address }`) with the coordinator under their names; waits until READY. */
async function registerAgents(c, agents) {
  for (const a of agents) await c.agents.registerAgent({ agentId: a.name, agent: { address: a.address } });
  for (const a of agents) {
    for (let i = 0; (await c.agents.getAgent({ name: `agents/${a.name}` })).state !== AgentState.READY; i++) {
      if (i > 300) throw new Error(`agents/${a.name} not READY after 30 s`);
      await sleep(100);
    }
  }
}

/**
 * Agents a1, a2 … under dir/<name> listening on loopback TCP too (`{ name, dir, address, socket, … }`),
 * and unless `coordArgs` is null a coordinator under dir/coord (`coordArgs` added) with them registered
 * and READY (`coord`, and its clients `c`). Each process is pushed to `daemons` as it starts (for
 * teardown).
 */
export async function startFleet(dir, daemons, { agents: n = 2, coordArgs = [] } = {}) {
  const agents = [];
  for (let i = 1; i <= n; i++) {
    const name = `a${i}`;
    const agent = startAgent(join(dir, name), ["--listen", "127.0.0.1:0"]);
    daemons.push(agent);
    agents.push({ ...agent, name, dir: join(dir, name), address: tcpAddressOf(await agent.ready) });
  }
  if (coordArgs === null) return { agents };
  const coord = startCoordinator(join(dir, "coord"), coordArgs);
  daemons.push(coord);
  await coord.ready;
  const c = coordinatorClients(coord.socket);
  await registerAgents(c, agents);
  return { agents, coord, c };
}
