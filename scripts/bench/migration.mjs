#!/usr/bin/env node
// Live migration benchmark: idle test guests moved between two real vmenv-agents on this host
// (PrepareVmMigration on B → MigrateVm on A → FinishVmMigration on B → DeleteVm on A, all VMs of a round
// at once) next to the floor: the same QEMU command lines (qemuArgs from the agent's build) started by
// hand, the destination with `-incoming defer`, and QEMU's `migrate` issued over QMP, timed from
// launching the destination to `cont` on it. One and four VMs; the agents' rounds go A→B then B→A.
// Prints total time, the ratio agents / by hand, and each VM's downtime as QEMU measured it
// (`query-migrate` on the source). Never fails for being slow: a benchmark is not a test.
//
//   node scripts/bench/migration.mjs [--samples 3] [--counts 1,4] [--memory-mib 192]
import { spawn } from "node:child_process";
import { mkdir, mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { toJson } from "@bufbuild/protobuf";
import { anyUnpack, durationFromMs, ValueSchema } from "@bufbuild/protobuf/wkt";
import {
  DiagnosticsService,
  HostService,
  OperationState,
  VmMigrationTargetSchema,
  VmService,
} from "@vmenv/api/agent/v1";
import { createDaemonClient } from "@vmenv/rpc";
import { findQemu } from "../../packages/agent/dist/host/qemu.js";
import { qemuArgs } from "../../packages/agent/dist/vmm/qemu/cmdline.js";
import { QmpClient } from "../../packages/agent/dist/vmm/qemu/qmp.js";

const { values: opt } = parseArgs({
  options: {
    samples: { type: "string", default: "3" },
    counts: { type: "string", default: "1,4" },
    "memory-mib": { type: "string", default: "192" },
  },
});
const samples = Number(opt.samples);
const counts = opt.counts.split(",").map(Number).filter(Boolean);
const memoryMib = Number(opt["memory-mib"]);
const root = resolve(import.meta.dirname, "../..");
const MIB = 1024n * 1024n;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const escapeRe = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

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

async function killMatching(pattern) {
  for (let i = 0; i < 50; i++) {
    const r = await run("pgrep", ["-f", pattern]);
    const pids = r.stdout
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

const image = await run(join(root, "scripts/guest-image"), [], 600_000);
const kernel = /^kernel=(.+)$/m.exec(image.stdout)?.[1];
const initrd = /^initrd=(.+)$/m.exec(image.stdout)?.[1];
if (image.code !== 0 || !kernel || !initrd) throw new Error(`scripts/guest-image failed:\n${image.stderr}`);
const qemu = await findQemu();
if (!qemu.available || !qemu.path) throw new Error(`QEMU not available: ${qemu.unavailableReason}`);
const dir = await mkdtemp(join(tmpdir(), "vmenv-bench-mig-"));
const cmdlineOf = (id) => `console=ttyS0 quiet vmenv.hostname=${id}`;
const specOf = (id) => ({
  vmm: "qemu",
  accelerator: undefined,
  vcpus: 1,
  maxVcpus: 1,
  memoryBytes: BigInt(memoryMib) * MIB,
  maxMemoryBytes: BigInt(memoryMib) * MIB,
  hostCpus: [],
  boot: { kind: "kernel", kernelPath: kernel, initrdPath: initrd, cmdline: cmdlineOf(id) },
});

// ---- By hand: two QEMUs with the agent's command line, QEMU's own migration over QMP ----

async function handLaunch(id, side, incoming) {
  const vmDir = join(dir, "hand", side, id);
  await mkdir(vmDir, { recursive: true, mode: 0o750 });
  const paths = {
    dir: vmDir,
    record: join(vmDir, "vm.json"),
    control: join(vmDir, "qmp.sock"),
    serialSocket: join(vmDir, "serial.sock"),
    serialLog: join(vmDir, "serial.log"),
    pidFile: join(vmDir, "vmm.pid"),
  };
  const args = qemuArgs({
    id,
    spec: specOf(id),
    accelerator: "tcg",
    paths,
    paused: false,
    disks: [],
    nics: [],
    ...(incoming ? { incoming: "defer" } : {}),
  });
  const r = await run(qemu.path, args);
  if (r.code !== 0) throw new Error(`QEMU did not start: ${r.stderr}`);
  const pid = Number((await readFile(paths.pidFile, "utf8")).trim());
  let qmp;
  for (let i = 0; i < 200 && !qmp; i++) {
    qmp = await QmpClient.connect(paths.control, { timeoutMs: 5000 }).catch(() => undefined);
    if (!qmp) await sleep(50);
  }
  return { id, pid, paths, qmp };
}

async function waitReady(logPath) {
  for (let i = 0; i < 1800; i++) {
    const log = await readFile(logPath, "latin1").catch(() => "");
    if (/VMENV-GUEST-READY/.test(log)) return;
    await sleep(100);
  }
  throw new Error(`no ready line in ${logPath}`);
}

async function handStop(vm) {
  vm.qmp?.close();
  try {
    process.kill(vm.pid, "SIGKILL");
  } catch {
    // already gone
  }
}

/** One round by hand: N sources (already up) each to a freshly launched destination, all at once. */
async function handRound(n, sample) {
  const sources = await Promise.all(
    Array.from({ length: n }, (_, i) => handLaunch(`h${n}-${sample}-${i}`, "src", false)),
  );
  await Promise.all(sources.map((s) => waitReady(s.paths.serialLog)));
  const t0 = performance.now();
  const results = await Promise.all(
    sources.map(async (src) => {
      const dst = await handLaunch(src.id, "dst", true);
      await dst.qmp.execute("migrate-incoming", { uri: "tcp:127.0.0.1:0" });
      const port = (await dst.qmp.execute("query-migrate"))["socket-address"][0].port;
      await src.qmp.execute("migrate-set-parameters", { "downtime-limit": 300 });
      await src.qmp.execute("migrate", { uri: `tcp:127.0.0.1:${port}` });
      let q;
      for (;;) {
        q = await src.qmp.execute("query-migrate");
        if (q.status === "completed") break;
        if (q.status === "failed" || q.status === "cancelled") throw new Error(`by hand: ${q["error-desc"]}`);
        await sleep(150);
      }
      for (;;) {
        const s = await dst.qmp.execute("query-status");
        if (s.status !== "inmigrate") break;
        await sleep(20);
      }
      await dst.qmp.execute("cont");
      const end = performance.now();
      await handStop(src);
      return { end, downtimeMs: q.downtime, dst };
    }),
  );
  const total = Math.max(...results.map((r) => r.end)) - t0;
  await Promise.all(results.map((r) => handStop(r.dst)));
  await rm(join(dir, "hand"), { recursive: true, force: true });
  return { totalMs: total, downtimes: results.map((r) => r.downtimeMs) };
}

// ---- Through two agents ----

async function startAgent(name) {
  const proc = spawn(
    process.execPath,
    [
      join(root, "packages/agent/dist/main.js"),
      "--state-dir",
      join(dir, name, "state"),
      "--socket",
      join(dir, name, "agent.sock"),
      "--listen",
      "127.0.0.1:0",
      "--accelerator",
      "tcg",
      "--kvm-probe-timeout-ms",
      "200",
    ],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  let err = "";
  const exited = new Promise((r) => proc.once("exit", (c, s) => r(c ?? s)));
  await new Promise((res, rej) => {
    proc.stderr.setEncoding("utf8").on("data", (d) => {
      err += d;
      if (err.includes('"msg":"vmenv-agent ready"')) res();
      if (err.length > 1e6) err = err.slice(-1e5);
    });
    void exited.then((c) => rej(new Error(`agent ${name} exited (${c}): ${err}`)));
    setTimeout(() => rej(new Error(`agent ${name} not ready after 30s`)), 30_000).unref();
  });
  const socket = join(dir, name, "agent.sock");
  const c = {
    name,
    proc,
    exited,
    vms: createDaemonClient(VmService, { socket, timeoutMs: 120_000 }),
    diag: createDaemonClient(DiagnosticsService, { socket, timeoutMs: 120_000 }),
  };
  await createDaemonClient(HostService, { socket, timeoutMs: 120_000 }).getHostInfo({});
  return c;
}

async function done(c, op) {
  let cur = op;
  while (cur.state === OperationState.RUNNING || cur.state === OperationState.PENDING)
    cur = await c.diag.waitOperation({ name: op.name, timeout: durationFromMs(60_000) });
  if (cur.state !== OperationState.SUCCEEDED)
    throw new Error(`${cur.kind} ${cur.target}: ${cur.error?.message}`);
  return cur;
}

/** Moves every VM named in `ids` from `from` to `to`, all at once; total time and downtimes. */
async function agentRound(from, to, ids) {
  const t0 = performance.now();
  const results = await Promise.all(
    ids.map(async (id) => {
      const name = `vms/${id}`;
      const vm = await from.vms.getVm({ name });
      const prep = await done(to, await to.vms.prepareVmMigration({ vmId: id, vm }));
      const target = anyUnpack(prep.result, VmMigrationTargetSchema);
      await done(from, await from.vms.migrateVm({ name, migrationUri: target.migrationUri }));
      await done(to, await to.vms.finishVmMigration({ name }));
      const end = performance.now();
      const q = await from.vms.executeQmpCommand({ name, command: "query-migrate" });
      await done(from, await from.vms.deleteVm({ name }));
      return { end, downtimeMs: toJson(ValueSchema, q.returnValue).downtime };
    }),
  );
  return {
    totalMs: Math.max(...results.map((r) => r.end)) - t0,
    downtimes: results.map((r) => r.downtimeMs),
  };
}

let a;
let b;
async function cleanup() {
  await killMatching(`qemu-system.*${escapeRe(dir)}`);
  for (const x of [a, b]) {
    if (!x) continue;
    if (x.proc.exitCode === null) x.proc.kill("SIGTERM");
    await x.exited;
  }
  await killMatching(escapeRe(dir));
  await rm(dir, { recursive: true, force: true });
}
for (const sig of ["SIGINT", "SIGTERM"]) {
  process.once(sig, () => void cleanup().finally(() => process.exit(130)));
}

const fmt = (ms) => `${ms.toFixed(0)} ms`;
try {
  [a, b] = await Promise.all([startAgent("a"), startAgent("b")]);
  console.log(
    `live migration, ${memoryMib} MiB idle TCG guests, loopback; ${samples} sample(s) per count; median total time`,
  );
  for (const n of counts) {
    const ids = Array.from({ length: n }, (_, i) => `m${n}-${i}`);
    await Promise.all(ids.map(async (id) => done(a, await a.vms.createVm(guestRequest(id)))));
    for (const id of ids) {
      for (let i = 0; i < 1800; i++) {
        if ((await a.vms.getVm({ name: `vms/${id}` })).guestReadyTime) break;
        await sleep(100);
      }
    }
    const agentT = [];
    const handT = [];
    const agentDown = [];
    const handDown = [];
    let here = a;
    let there = b;
    for (let s = 0; s < samples; s++) {
      const r = await agentRound(here, there, ids);
      agentT.push(r.totalMs);
      agentDown.push(...r.downtimes);
      [here, there] = [there, here];
      const h = await handRound(n, s);
      handT.push(h.totalMs);
      handDown.push(...h.downtimes);
    }
    for (const id of ids) await done(here, await here.vms.deleteVm({ name: `vms/${id}`, force: true }));
    const am = median(agentT);
    const hm = median(handT);
    console.log(
      `${n} VM(s): agents ${fmt(am)} (${agentT.map(fmt).join(", ")}), by hand ${fmt(hm)} (${handT.map(fmt).join(", ")}), ratio ${(am / hm).toFixed(2)}x`,
    );
    console.log(`  downtime per VM: agents ${agentDown.join(", ")} ms; by hand ${handDown.join(", ")} ms`);
  }
} finally {
  await cleanup();
}

function guestRequest(id) {
  return {
    vmId: id,
    start: true,
    vm: {
      spec: {
        vcpus: 1,
        memoryBytes: BigInt(memoryMib) * MIB,
        boot: {
          method: {
            case: "directKernel",
            value: { kernelPath: kernel, initrdPath: initrd, cmdline: cmdlineOf(id) },
          },
        },
      },
    },
  };
}
