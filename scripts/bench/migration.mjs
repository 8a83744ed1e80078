#!/usr/bin/env node
// Live migration benchmark: idle test guests moved between two real vmenv-agents on this host, next to
// the floor: the same QEMU command lines (qemuArgs from the agent's build) started by hand, the
// destination with `-incoming defer`, and QEMU's `migrate` issued over QMP, timed from launching the
// destination to `cont` on it. One and four VMs. Prints total time, the ratio against by hand, and each
// VM's downtime as QEMU measured it (`query-migrate` on the source). Never fails for being slow: a
// benchmark is not a test. Two ways in (`--via`, either or both):
//
// - agents: PrepareVmMigration on B → MigrateVm on A → FinishVmMigration on B → DeleteVm on A, all VMs
//   of a round at once (by hand: all at once too); rounds go A→B then B→A.
// - coordinator: a real vmenv-coordinator with both agents registered, an environment of N members on
//   one agent, MigrateEnvironment to the other, timed from the call to the operation SUCCEEDED. The
//   coordinator moves members one after the other, so the by-hand round does too. Downtime: the source
//   agent's "migration completed" log line (QEMU's `query-migrate` there, ADR 0015).
//
//   node scripts/bench/migration.mjs [--via agents,coordinator] [--samples 3] [--counts 1,4] [--memory-mib 192]
import { mkdir, mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { toJson } from "@bufbuild/protobuf";
import { anyUnpack, ValueSchema } from "@bufbuild/protobuf/wkt";
import { DiagnosticsService, VmMigrationTargetSchema, VmService } from "@vmenv/api/agent/v1";
import { createDaemonClient } from "@vmenv/rpc";
import { findQemu } from "../../packages/agent/dist/host/qemu.js";
import { qemuArgs } from "../../packages/agent/dist/vmm/qemu/cmdline.js";
import { QmpClient } from "../../packages/agent/dist/vmm/qemu/qmp.js";
import * as bench from "./lib.mjs";

const { values: opt } = parseArgs({
  options: {
    via: { type: "string", default: "agents" },
    samples: { type: "string", default: "3" },
    counts: { type: "string", default: "1,4" },
    "memory-mib": { type: "string", default: "192" },
  },
});
const via = opt.via.split(",");
const samples = Number(opt.samples);
const counts = opt.counts.split(",").map(Number).filter(Boolean);
const memoryMib = Number(opt["memory-mib"]);

const { kernel, initrd } = await bench.guestImage();
const qemu = await findQemu();
if (!qemu.available || !qemu.path) throw new Error(`QEMU not available: ${qemu.unavailableReason}`);
const dir = await mkdtemp(join(tmpdir(), "vmenv-bench-mig-"));
const cmdlineOf = (id) => `console=ttyS0 quiet vmenv.hostname=${id}`;
const specOf = (id) => ({
  vmm: "qemu",
  accelerator: undefined,
  vcpus: 1,
  maxVcpus: 1,
  memoryBytes: BigInt(memoryMib) * bench.MIB,
  maxMemoryBytes: BigInt(memoryMib) * bench.MIB,
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
  const r = await bench.run(qemu.path, args);
  if (r.code !== 0) throw new Error(`QEMU did not start: ${r.stderr}`);
  const pid = Number((await readFile(paths.pidFile, "utf8")).trim());
  let qmp;
  for (let i = 0; i < 200 && !qmp; i++) {
    qmp = await QmpClient.connect(paths.control, { timeoutMs: 5000 }).catch(() => undefined);
    if (!qmp) await bench.sleep(50);
  }
  return { id, pid, paths, qmp };
}

async function waitReady(logPath) {
  for (let i = 0; i < 1800; i++) {
    const log = await readFile(logPath, "latin1").catch(() => "");
    if (/VMENV-GUEST-READY/.test(log)) return;
    await bench.sleep(100);
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

/**
 * One round by hand: N sources (already up) each to a freshly launched destination, all at once or (as
 * the coordinator does) one after the other.
 */
async function handRound(n, sample, parallel) {
  const sources = await Promise.all(
    Array.from({ length: n }, (_, i) => handLaunch(`h${n}-${sample}-${i}`, "src", false)),
  );
  await Promise.all(sources.map((s) => waitReady(s.paths.serialLog)));
  const move = async (src) => {
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
      await bench.sleep(150);
    }
    for (;;) {
      const s = await dst.qmp.execute("query-status");
      if (s.status !== "inmigrate") break;
      await bench.sleep(20);
    }
    await dst.qmp.execute("cont");
    const end = performance.now();
    await handStop(src);
    return { end, downtimeMs: q.downtime, dst };
  };
  const t0 = performance.now();
  const results = [];
  if (parallel) results.push(...(await Promise.all(sources.map(move))));
  else for (const src of sources) results.push(await move(src));
  const total = Math.max(...results.map((r) => r.end)) - t0;
  await Promise.all(results.map((r) => handStop(r.dst)));
  await rm(join(dir, "hand"), { recursive: true, force: true });
  return { totalMs: total, downtimes: results.map((r) => r.downtimeMs) };
}

// ---- Through two agents ----

/** Clients of an agent's VM and diagnostics services. */
function withClients(agent) {
  const cfg = { socket: agent.socket, timeoutMs: 120_000 };
  return {
    ...agent,
    vms: createDaemonClient(VmService, cfg),
    diag: createDaemonClient(DiagnosticsService, cfg),
  };
}

/** Waits until every VM named is up (the guest's ready line). */
async function guestsReady(agent, names) {
  for (const name of names) {
    for (let i = 0; i < 1800; i++) {
      if ((await agent.vms.getVm({ name })).guestReadyTime) break;
      await bench.sleep(100);
    }
  }
}

/** Moves every VM named in `ids` from `from` to `to`, all at once; total time and downtimes. */
async function agentRound(from, to, ids) {
  const t0 = performance.now();
  const results = await Promise.all(
    ids.map(async (id) => {
      const name = `vms/${id}`;
      const vm = await from.vms.getVm({ name });
      const prep = await bench.finished(to.diag, await to.vms.prepareVmMigration({ vmId: id, vm }));
      const target = anyUnpack(prep.result, VmMigrationTargetSchema);
      await bench.finished(from.diag, await from.vms.migrateVm({ name, migrationUri: target.migrationUri }));
      await bench.finished(to.diag, await to.vms.finishVmMigration({ name }));
      const end = performance.now();
      const q = await from.vms.executeQmpCommand({ name, command: "query-migrate" });
      await bench.finished(from.diag, await from.vms.deleteVm({ name }));
      return { end, downtimeMs: toJson(ValueSchema, q.returnValue).downtime };
    }),
  );
  return {
    totalMs: Math.max(...results.map((r) => r.end)) - t0,
    downtimes: results.map((r) => r.downtimeMs),
  };
}

async function viaAgents(a, b, n) {
  const ids = Array.from({ length: n }, (_, i) => `m${n}-${i}`);
  await Promise.all(
    ids.map(async (id) =>
      bench.finished(a.diag, await a.vms.createVm(bench.guestVm({ id, kernel, initrd, memoryMib })), 120_000),
    ),
  );
  await guestsReady(
    a,
    ids.map((id) => `vms/${id}`),
  );
  const r = { via: [], hand: [], viaDown: [], handDown: [] };
  let here = a;
  let there = b;
  for (let s = 0; s < samples; s++) {
    const m = await agentRound(here, there, ids);
    r.via.push(m.totalMs);
    r.viaDown.push(...m.downtimes);
    [here, there] = [there, here];
    const h = await handRound(n, s, true);
    r.hand.push(h.totalMs);
    r.handDown.push(...h.downtimes);
  }
  for (const id of ids)
    await bench.finished(here.diag, await here.vms.deleteVm({ name: `vms/${id}`, force: true }));
  return r;
}

// ---- Through the coordinator ----

/** Downtimes (ms) of the migrations the agent's log reports after offset `from`, for VMs named in `names`. */
function loggedDowntimes(agent, from, names) {
  const out = [];
  for (const line of agent.log().slice(from).split("\n")) {
    if (!line.includes('"msg":"migration completed"')) continue;
    try {
      const j = JSON.parse(line);
      if (names.includes(j.vm)) out.push(j.downtimeMs);
    } catch {
      // a line still being written
    }
  }
  return out;
}

async function viaCoordinator(agents, n) {
  const [a, b] = agents;
  const env = `mig${n}`;
  const members = Array.from({ length: n }, (_, i) => `m${i}`);
  const names = members.map((m) => `vms/${env}-${m}`);
  await bench.coordFinished(
    coord.c,
    await coord.c.envs.createEnvironment({
      environmentId: env,
      environment: {
        node: "nodes/bench",
        members: members.map((id) => ({
          id,
          role: "",
          spec: bench.guestVm({ id, kernel, initrd, memoryMib }).vm.spec,
          placement: { agent: `agents/${a.name}` },
        })),
      },
      start: true,
    }),
  );
  await guestsReady(a, names);
  const r = { via: [], hand: [], viaDown: [], handDown: [] };
  let here = a;
  let there = b;
  for (let s = 0; s < samples; s++) {
    const logFrom = here.log().length;
    const t0 = performance.now();
    await bench.coordFinished(
      coord.c,
      await coord.c.envs.migrateEnvironment({ name: `environments/${env}`, agent: `agents/${there.name}` }),
    );
    r.via.push(performance.now() - t0);
    // The source logs each move before its confirm step; its stderr may reach us a moment later.
    let down = loggedDowntimes(here, logFrom, names);
    for (let i = 0; i < 40 && down.length < n; i++) {
      await bench.sleep(50);
      down = loggedDowntimes(here, logFrom, names);
    }
    r.viaDown.push(...down);
    [here, there] = [there, here];
    const h = await handRound(n, s, false);
    r.hand.push(h.totalMs);
    r.handDown.push(...h.downtimes);
  }
  await bench.coordFinished(coord.c, await coord.c.envs.deleteEnvironment({ name: `environments/${env}` }));
  return r;
}

// ---- The run ----

const daemons = [];
let coord;
const cleanup = bench.teardown(dir, daemons);
const fmt = (ms) => `${ms.toFixed(0)} ms`;
try {
  const fleet = await bench.startFleet(dir, daemons, { coordArgs: via.includes("coordinator") ? [] : null });
  const agents = fleet.agents.map(withClients);
  coord = fleet.coord && { ...fleet.coord, c: fleet.c };
  await coord?.c.tree.createNode({ nodeId: "bench", node: { policy: { maxVms: 16 } } });
  console.log(
    `live migration, ${memoryMib} MiB idle TCG guests, loopback; ${samples} sample(s) per count; median total time`,
  );
  for (const way of via) {
    for (const n of counts) {
      const r = way === "coordinator" ? await viaCoordinator(agents, n) : await viaAgents(...agents, n);
      const vm = bench.median(r.via);
      const hm = bench.median(r.hand);
      const how = way === "coordinator" ? "one after the other" : "all at once";
      console.log(
        `${n} VM(s) via ${way} (${how}): ${fmt(vm)} (${r.via.map(fmt).join(", ")}), by hand ${fmt(hm)} (${r.hand.map(fmt).join(", ")}), ratio ${(vm / hm).toFixed(2)}x`,
      );
      console.log(
        `  downtime per VM: ${way} ${r.viaDown.join(", ")} ms; by hand ${r.handDown.join(", ")} ms`,
      );
    }
  }
} finally {
  await cleanup();
}
