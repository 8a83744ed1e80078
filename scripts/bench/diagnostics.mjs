#!/usr/bin/env node
// Diagnostics benchmark: what the agent costs in memory idle and with N VMs, and what a statistics scrape
// of those VMs costs (wall time per GetStatistics and per GET /metrics, and the agent's own CPU time per
// scrape from /proc/<agent>/stat), next to the same scrape with no VM (the baseline, measured in the same
// run). VMs are the test guest with little memory; by default they are started paused (QEMU runs, its
// vCPUs do not), so that N guests booting at once on a small machine do not drown the measurement; with
// --running they boot (they need not finish). Prints; never fails for being slow.
//
//   node scripts/bench/diagnostics.mjs [--vms 20] [--memory-mib 128] [--scrapes 20] [--running]
import { readFileSync } from "node:fs";
import { mkdtemp } from "node:fs/promises";
import { cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { DiagnosticsService, HostService, VmService } from "@vmenv/api/agent/v1";
import { createDaemonClient } from "@vmenv/rpc";
import {
  cpuTicks,
  finished,
  guestImage,
  guestVm,
  median,
  sleep,
  startAgent,
  teardown,
  ticksToMs,
} from "./lib.mjs";

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
const pct = (xs, p) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(xs.length * p))];

/** VmRSS of a process, in bytes. */
function rss(pid) {
  return Number(/^VmRSS:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1] ?? 0) * 1024;
}
const mib = (b) => `${(b / 1024 / 1024).toFixed(1)} MiB`;

const { kernel, initrd } = await guestImage();

const dir = await mkdtemp(join(tmpdir(), "vmenv-bench-diag-"));
const agent = startAgent(dir, ["--metrics-listen", "127.0.0.1:0"]);
const agentProc = agent.proc;
const cleanup = teardown(dir, agent);

/** `scrapes` scrapes one after another: wall ms each, and the agent's CPU ms per scrape. */
async function measure(scrape) {
  await scrape(); // warm
  const walls = [];
  const t0 = cpuTicks(agentProc.pid).self;
  for (let i = 0; i < scrapes; i++) {
    const s = performance.now();
    await scrape();
    walls.push(performance.now() - s);
  }
  const cpuMs = ticksToMs(cpuTicks(agentProc.pid).self - t0) / scrapes;
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
  const metricsAddress = /"metricsAddress":"([^"]+)"/.exec(await agent.ready)?.[1];
  const { socket } = agent;
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
    ops.push(await vms.createVm(guestVm({ id, kernel, initrd, memoryMib, start: opt.running })));
  }
  const finish = (op) => finished(diag, op);
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
