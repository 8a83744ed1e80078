#!/usr/bin/env node
// Diagnostics benchmark: what the agent costs in memory idle and with N VMs, and what a statistics scrape
// of those VMs costs (wall time per GetStatistics and per GET /metrics, and the agent's own CPU time per
// scrape from /proc/<agent>/stat), next to the same scrape with no VM (the baseline, measured in the same
// run). VMs are the test guest with little memory; by default they are started paused (QEMU runs, its
// vCPUs do not), so that N guests booting at once on a small machine do not drown the measurement; with
// --running they boot (they need not finish). Prints; never fails for being slow.
//
//   node scripts/bench/diagnostics.mjs [--vms 20] [--memory-mib 128] [--scrapes 20] [--running]
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { cpus, tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { DiagnosticsService, HostService, OperationState, VmService } from "@vmenv/api/agent/v1";
import { createDaemonClient } from "@vmenv/rpc";

const { values: opt } = parseArgs({
  options: {
    vms: { type: "string", default: "20" },
    "memory-mib": { type: "string", default: "128" },
    scrapes: { type: "string", default: "20" },
    running: { type: "boolean", default: false },
  },
});
const N = Number(opt.vms);
const memoryMib = Number(opt["memory-mib"]);
const scrapes = Number(opt.scrapes);
const root = resolve(import.meta.dirname, "../..");
const MIB = 1024n * 1024n;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const pct = (xs, p) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(xs.length * p))];

/** Runs a command with arguments (never through a shell). */
function run(cmd, args, timeoutMs = 60_000) {
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

/** utime+stime of a process, in clock ticks. */
function cpuTicks(pid) {
  const stat = readFileSync(`/proc/${pid}/stat`, "latin1");
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return Number(f[11]) + Number(f[12]);
}
/** VmRSS of a process, in bytes. */
function rss(pid) {
  return Number(/^VmRSS:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1] ?? 0) * 1024;
}
const escapeRe = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
async function killMatching(pattern) {
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

const clkTck = Number((await run("getconf", ["CLK_TCK"])).stdout.trim()) || 100;
const ticksToMs = (t) => (t * 1000) / clkTck;
const mib = (b) => `${(b / 1024 / 1024).toFixed(1)} MiB`;

const image = await run(join(root, "scripts/guest-image"), [], 600_000);
const kernel = /^kernel=(.+)$/m.exec(image.stdout)?.[1];
const initrd = /^initrd=(.+)$/m.exec(image.stdout)?.[1];
if (image.code !== 0 || !kernel || !initrd) throw new Error(`scripts/guest-image failed:\n${image.stderr}`);

const dir = await mkdtemp(join(tmpdir(), "vmenv-bench-diag-"));
const agentProc = spawn(
  process.execPath,
  [
    join(root, "packages/agent/dist/main.js"),
    "--state-dir",
    join(dir, "agent"),
    "--socket",
    join(dir, "agent.sock"),
    "--listen",
    "off",
    "--accelerator",
    "tcg",
    "--kvm-probe-timeout-ms",
    "200",
    "--metrics-listen",
    "127.0.0.1:0",
  ],
  { stdio: ["ignore", "ignore", "pipe"] },
);
let agentErr = "";
let metricsAddress = "";
const agentExited = new Promise((r) => agentProc.once("exit", (c, s) => r(c ?? s)));
const agentReady = new Promise((res, rej) => {
  agentProc.stderr.setEncoding("utf8").on("data", (d) => {
    agentErr += d;
    const m = /"msg":"vmenv-agent ready"/.test(agentErr) && /"metricsAddress":"([^"]+)"/.exec(agentErr);
    if (m) {
      metricsAddress = m[1];
      res();
    }
    if (agentErr.length > 1e6) agentErr = agentErr.slice(-1e5);
  });
  void agentExited.then((c) => rej(new Error(`vmenv-agent exited (${c}): ${agentErr}`)));
  setTimeout(() => rej(new Error(`vmenv-agent not ready after 30s: ${agentErr}`)), 30_000).unref();
});

let cleaned;
function cleanup() {
  cleaned ??= (async () => {
    await killMatching(`qemu-system.*${escapeRe(dir)}`);
    if (agentProc.exitCode === null && agentProc.signalCode === null) agentProc.kill("SIGTERM");
    const t = setTimeout(() => agentProc.kill("SIGKILL"), 10_000);
    await agentExited;
    clearTimeout(t);
    await killMatching(escapeRe(dir));
    await rm(dir, { recursive: true, force: true });
  })();
  return cleaned;
}
for (const sig of ["SIGINT", "SIGTERM"]) {
  process.once(sig, () => {
    console.error(`\n${sig}: cleaning up`);
    void cleanup().finally(() => process.exit(sig === "SIGINT" ? 130 : 143));
  });
}

/** `scrapes` scrapes one after another: wall ms each, and the agent's CPU ms per scrape. */
async function measure(scrape) {
  await scrape(); // warm
  const walls = [];
  const t0 = cpuTicks(agentProc.pid);
  for (let i = 0; i < scrapes; i++) {
    const s = performance.now();
    await scrape();
    walls.push(performance.now() - s);
  }
  const cpuMs = ticksToMs(cpuTicks(agentProc.pid) - t0) / scrapes;
  return { median: median(walls), p90: pct(walls, 0.9), cpuMs };
}
/** The agent's RSS, as the median of 5 readings a second apart (after a GC-friendly pause). */
async function steadyRss() {
  const xs = [];
  for (let i = 0; i < 5; i++) {
    xs.push(rss(agentProc.pid));
    await sleep(1000);
  }
  return median(xs);
}

try {
  await agentReady;
  const socket = join(dir, "agent.sock");
  const vms = createDaemonClient(VmService, { socket, timeoutMs: 300_000 });
  const diag = createDaemonClient(DiagnosticsService, { socket, timeoutMs: 300_000 });
  await createDaemonClient(HostService, { socket, timeoutMs: 120_000 }).getHostInfo({});
  const grpcScrape = async (want) => {
    const s = await diag.getStatistics({});
    if (s.vms.length !== want) throw new Error(`expected ${want} VMs in the sample, got ${s.vms.length}`);
  };
  const httpScrape = async () => {
    const r = await fetch(`http://${metricsAddress}/metrics`);
    if (r.status !== 200) throw new Error(`/metrics answered ${r.status}`);
    await r.text();
  };

  console.log(
    `diagnostics benchmark: ${cpus().length} CPUs (${cpus()[0]?.model ?? "?"}), ${N} VMs of ${memoryMib} MiB ` +
      `(${opt.running ? "running: booting under TCG" : "paused: QEMU up, vCPUs stopped"}), ${scrapes} scrapes each\n`,
  );
  const idleRss = await steadyRss();
  const idleGrpc = await measure(() => grpcScrape(0));
  const idleHttp = await measure(httpScrape);

  const tCreate = performance.now();
  const ops = [];
  for (let i = 0; i < N; i++) {
    const id = `b${i}`;
    ops.push(
      await vms.createVm({
        vmId: id,
        start: opt.running,
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
          },
        },
      }),
    );
  }
  const finish = async (op) => {
    let cur = op;
    while (cur.state === OperationState.RUNNING || cur.state === OperationState.PENDING)
      cur = await diag.waitOperation({ name: op.name, timeout: durationFromMs(60_000) });
    if (cur.state !== OperationState.SUCCEEDED)
      throw new Error(`${cur.kind} ${cur.target}: ${cur.error?.message}`);
  };
  await Promise.all(ops.map(finish));
  if (!opt.running) {
    for (let i = 0; i < N; i++) await finish(await vms.startVm({ name: `vms/b${i}`, paused: true }));
  }
  const createS = (performance.now() - tCreate) / 1000;
  await sleep(3000);
  const loadedRss = await steadyRss();
  const loadedGrpc = await measure(() => grpcScrape(N));
  const loadedHttp = await measure(httpScrape);
  const sample = await diag.getStatistics({});
  const qemuRss = sample.vms.reduce((a, v) => a + Number(v.memoryRssBytes), 0);

  const row = (what, idle, loaded) => `${what.padEnd(34)} ${idle.padStart(14)} ${loaded.padStart(14)}`;
  const ratio = (a, b) => (a > 0 ? `${(b / a).toFixed(1)}x` : "-");
  console.log(row("", "no VM", `${N} VMs`));
  console.log(row("agent RSS", mib(idleRss), mib(loadedRss)));
  console.log(
    row(
      "GetStatistics wall (median / p90)",
      `${idleGrpc.median.toFixed(1)} / ${idleGrpc.p90.toFixed(1)} ms`,
      `${loadedGrpc.median.toFixed(1)} / ${loadedGrpc.p90.toFixed(1)} ms`,
    ),
  );
  console.log(
    row(
      "GetStatistics agent CPU / scrape",
      `${idleGrpc.cpuMs.toFixed(1)} ms`,
      `${loadedGrpc.cpuMs.toFixed(1)} ms`,
    ),
  );
  console.log(
    row(
      "GET /metrics wall (median / p90)",
      `${idleHttp.median.toFixed(1)} / ${idleHttp.p90.toFixed(1)} ms`,
      `${loadedHttp.median.toFixed(1)} / ${loadedHttp.p90.toFixed(1)} ms`,
    ),
  );
  console.log(
    row(
      "GET /metrics agent CPU / scrape",
      `${idleHttp.cpuMs.toFixed(1)} ms`,
      `${loadedHttp.cpuMs.toFixed(1)} ms`,
    ),
  );
  console.log(
    `\nper VM: agent RSS +${mib((loadedRss - idleRss) / Math.max(1, N))}, GetStatistics +${((loadedGrpc.median - idleGrpc.median) / Math.max(1, N)).toFixed(2)} ms wall ` +
      `and +${((loadedGrpc.cpuMs - idleGrpc.cpuMs) / Math.max(1, N)).toFixed(2)} ms agent CPU; ` +
      `ratios ${N} VMs / none: RSS ${ratio(idleRss, loadedRss)}, scrape wall ${ratio(idleGrpc.median, loadedGrpc.median)}, ` +
      `scrape CPU ${ratio(idleGrpc.cpuMs, loadedGrpc.cpuMs)}`,
  );
  console.log(`(QEMU processes: ${mib(qemuRss)} RSS in all; ${N} creates took ${createS.toFixed(1)} s)`);
} finally {
  await cleanup();
}
