#!/usr/bin/env node
// VM create benchmark: time from asking for a VM to its guest saying it is up, through a real
// vmenv-agent (CreateVm → the WatchVms event with guest_ready_time set) next to the floor: the same QEMU
// command line (qemuArgs from the agent's build) started by hand, timed from spawn to the ready line on
// the serial socket. Samples alternate between the two so that drift in the machine hits both alike.
// Also the agent's own CPU time per VM (/proc/<pid>/stat utime+stime), and N creates at once (VMs/s).
// Prints the ratios agent / by hand. Never fails for being slow: a benchmark is not a test.
//
//   node scripts/bench/vm-create.mjs [--samples 5] [--parallel 4,16] [--memory-mib 192]
//     [--parallel-memory-mib 192] [--warmup 1]
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm } from "node:fs/promises";
import * as net from "node:net";
import { cpus, tmpdir, totalmem } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { DiagnosticsService, HostService, VmService, WatchEventType } from "@vmenv/api/agent/v1";
import { createDaemonClient } from "@vmenv/rpc";
import { findQemu } from "../../packages/agent/dist/host/qemu.js";
import { qemuArgs } from "../../packages/agent/dist/vmm/qemu/cmdline.js";
import {
  clkTck,
  cpuTicks,
  escapeRe,
  finished,
  guestImage,
  guestVm,
  MIB,
  median,
  run,
  sleep,
  startAgent,
  teardown,
  ticksToMs,
} from "./lib.mjs";

const { values: opt } = parseArgs({
  options: {
    samples: { type: "string", default: "5" },
    parallel: { type: "string", default: "4,16" },
    "memory-mib": { type: "string", default: "192" },
    "parallel-memory-mib": { type: "string", default: "192" },
    warmup: { type: "string", default: "1" },
  },
});
const samples = Number(opt.samples);
const parallel = opt.parallel
  .split(",")
  .map((s) => s.trim())
  .filter(Boolean)
  .map(Number);
const memoryMib = Number(opt["memory-mib"]);
const parallelMemoryMib = Number(opt["parallel-memory-mib"]);
const warmup = Number(opt.warmup);
/** The agent's default guest-ready pattern (--guest-ready-pattern). */
const READY = /VMENV-GUEST-READY/;
const BOOT_TIMEOUT_MS = 180_000;
/** For N boots at once on a small machine: generous, but bounded. */
const parallelTimeoutMs = (n) => Math.min(15 * 60_000, Math.max(BOOT_TIMEOUT_MS, n * 60_000));

const min = (xs) => Math.min(...xs);
const max = (xs) => Math.max(...xs);

/** Whether a process runs (a zombie does not: a daemonized QEMU is init's child). */
function alive(pid) {
  try {
    process.kill(pid, 0);
    const stat = readFileSync(`/proc/${pid}/stat`, "latin1");
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
  } catch {
    return false;
  }
}

const { kernel, initrd } = await guestImage();
const qemu = await findQemu();
if (!qemu.available || !qemu.path) throw new Error(`QEMU not available: ${qemu.unavailableReason}`);

const dir = await mkdtemp(join(tmpdir(), "vmenv-bench-vm-"));
const cmdlineOf = (id) => `console=ttyS0 quiet vmenv.hostname=${id}`;

// ---- By hand: the agent's QEMU command line, started and watched without the agent ----

/**
 * Connects to a serial socket (retrying until QEMU has made it); `ready` resolves with performance.now()
 * at the chunk that completes the ready line. `cancel` stops watching.
 */
function serialReady(path, deadline) {
  let cancel;
  const ready = new Promise((res, rej) => {
    let tail = "";
    let done = false;
    let sock;
    const finish = (err, t) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      sock?.destroy();
      if (err) rej(err);
      else res(t);
    };
    const timer = setTimeout(
      () => finish(new Error(`no ready line on ${path} within the time limit`)),
      deadline - performance.now(),
    );
    cancel = () => finish(new Error("cancelled"));
    const connect = () => {
      if (done) return;
      sock = net.connect({ path });
      sock.on("data", (d) => {
        const t = performance.now();
        const text = tail + d.toString("latin1");
        const lines = text.split(/\r?\n/);
        tail = (lines.pop() ?? "").slice(-4096);
        if (lines.some((l) => READY.test(l))) finish(undefined, t);
      });
      sock.on("error", () => undefined);
      sock.on("close", () => {
        if (!done) setTimeout(connect, 10);
      });
    };
    connect();
  });
  ready.catch(() => undefined); // awaited by the caller; not unhandled when the launch fails first
  return { ready, cancel };
}

/** Starts one QEMU by hand; resolves once it has daemonized and its pid is known (and its ready promise). */
async function handStart(id, memMib, t0, deadline) {
  const vmDir = join(dir, "hand", id);
  await mkdir(vmDir, { recursive: true, mode: 0o750 });
  const paths = {
    dir: vmDir,
    record: join(vmDir, "vm.json"),
    control: join(vmDir, "qmp.sock"),
    serialSocket: join(vmDir, "serial.sock"),
    serialLog: join(vmDir, "serial.log"),
    pidFile: join(vmDir, "vmm.pid"),
  };
  const mem = BigInt(memMib) * MIB;
  const args = qemuArgs({
    id,
    spec: {
      vmm: "qemu",
      accelerator: undefined,
      vcpus: 1,
      maxVcpus: 1,
      memoryBytes: mem,
      maxMemoryBytes: mem,
      hostCpus: [],
      boot: { kind: "kernel", kernelPath: kernel, initrdPath: initrd, cmdline: cmdlineOf(id) },
    },
    accelerator: "tcg",
    paths,
    paused: false,
    disks: [],
    nics: [],
  });
  const proc = spawn(qemu.path, args, { stdio: ["ignore", "ignore", "pipe"] });
  const serial = serialReady(paths.serialSocket, deadline);
  let stderr = "";
  proc.stderr.setEncoding("utf8").on("data", (d) => (stderr += d));
  const code = await new Promise((r) => {
    proc.once("error", () => r(-1));
    proc.once("exit", (c) => r(c));
  });
  const launched = performance.now() - t0;
  if (code !== 0) {
    serial.cancel();
    throw new Error(`QEMU did not start (${code}): ${stderr}`);
  }
  const pid = Number((await readFile(paths.pidFile, "utf8")).trim());
  return { id, pid, vmDir, ready: serial.ready, cancel: serial.cancel, launched };
}

async function handStop(vm) {
  vm.cancel();
  try {
    process.kill(vm.pid, "SIGKILL");
  } catch {
    // already gone
  }
  for (let i = 0; i < 200 && alive(vm.pid); i++) await sleep(10);
  await rm(vm.vmDir, { recursive: true, force: true });
}

/** One VM by hand: spawn → ready line. */
async function handSample(id) {
  const t0 = performance.now();
  const vm = await handStart(id, memoryMib, t0, t0 + BOOT_TIMEOUT_MS);
  try {
    const tReady = await vm.ready;
    return { readyMs: tReady - t0, launchMs: vm.launched };
  } finally {
    await handStop(vm);
  }
}

/** N VMs by hand at once: wall time from the first spawn to the last ready line. */
async function handParallel(n) {
  const t0 = performance.now();
  const deadline = t0 + parallelTimeoutMs(n);
  const started = await Promise.allSettled(
    Array.from({ length: n }, (_, i) => handStart(`hand-p${n}-${i}`, parallelMemoryMib, t0, deadline)),
  );
  const vms = started.filter((s) => s.status === "fulfilled").map((s) => s.value);
  try {
    const failed = started.find((s) => s.status === "rejected");
    if (failed) throw failed.reason;
    const readies = await Promise.all(vms.map((v) => v.ready));
    return { wallMs: max(readies) - t0 };
  } finally {
    await Promise.all(vms.map(handStop));
  }
}

// ---- Through the agent ----

const daemon = startAgent(dir);

const watchAbort = new AbortController();
/** Kills every QEMU of this run (by hand or the agent's: they outlive the agent), stops the agent. */
const cleanup = teardown(dir, daemon, async () => watchAbort.abort());

try {
  await daemon.ready;
  const { socket } = daemon;
  const vms = createDaemonClient(VmService, { socket, timeoutMs: 120_000 });
  const diag = createDaemonClient(DiagnosticsService, { socket, timeoutMs: 120_000 });
  const host = createDaemonClient(HostService, { socket, timeoutMs: 120_000 });
  await host.getHostInfo({}); // waits for the accelerator probes, which run once at start

  // One WatchVms stream for the whole run; each create waits for its VM's ready event on it.
  const waiters = new Map(); // name → { resolve, reject }
  let synced;
  const syncedP = new Promise((r) => (synced = r));
  const watching = (async () => {
    for await (const ev of vms.watchVms({}, { signal: watchAbort.signal, timeoutMs: 0 })) {
      if (ev.type === WatchEventType.SYNCED) synced();
      if (ev.type !== WatchEventType.UPDATED || !ev.vm?.guestReadyTime) continue;
      const w = waiters.get(ev.vm.name);
      if (!w) continue;
      waiters.delete(ev.vm.name);
      w.resolve({ t: performance.now(), wall: Date.now(), vm: ev.vm });
    }
  })().catch((e) => {
    if (!watchAbort.signal.aborted) for (const w of waiters.values()) w.reject(e);
  });
  // The stream has sent its snapshot (so no change is missed), or it ended first, which is an error.
  await Promise.race([
    syncedP,
    watching.then(() => {
      throw new Error("WatchVms ended before it was synced");
    }),
  ]);

  /** Waits for the ready event of `name`; `cancel` forgets the waiter. */
  const readyEvent = (name, timeoutMs) => {
    let cancel;
    const ready = new Promise((res, rej) => {
      const t = setTimeout(() => {
        waiters.delete(name);
        rej(new Error(`${name}: no ready event within ${timeoutMs} ms`));
      }, timeoutMs);
      cancel = () => {
        clearTimeout(t);
        waiters.delete(name);
      };
      waiters.set(name, {
        resolve: (x) => {
          clearTimeout(t);
          res(x);
        },
        reject: (e) => {
          clearTimeout(t);
          rej(e);
        },
      });
    });
    return { ready, cancel };
  };

  const done = (op) => finished(diag, op);

  const createReq = (id, memMib) => guestVm({ id, kernel, initrd, memoryMib: memMib });

  /** Sends CreateVm; resolves at the ready event (rejects if the create operation fails first). */
  const createToReady = async (id, memMib, timeoutMs) => {
    const { ready, cancel } = readyEvent(`vms/${id}`, timeoutMs);
    try {
      const t0 = performance.now();
      const op = await vms.createVm(createReq(id, memMib));
      const rpcMs = performance.now() - t0;
      const opDone = done(op);
      const ev = await Promise.race([ready, opDone.then(() => ready)]);
      await opDone;
      return { t0, rpcMs, ev };
    } finally {
      cancel();
    }
  };

  const remove = async (ids) => {
    await Promise.all(ids.map(async (id) => done(await vms.deleteVm({ name: `vms/${id}`, force: true }))));
  };

  const agentPid = daemon.proc.pid;

  /** One VM through the agent: CreateVm → ready event, then delete; with the agent's CPU for each part. */
  async function agentSample(id) {
    const c0 = cpuTicks(agentPid);
    const { t0, rpcMs, ev } = await createToReady(id, memoryMib, BOOT_TIMEOUT_MS);
    const c1 = cpuTicks(agentPid);
    const tDel = performance.now();
    await remove([id]);
    const deleteMs = performance.now() - tDel;
    const c2 = cpuTicks(agentPid);
    const created = timestampMs(ev.vm.createTime);
    const started = timestampMs(ev.vm.startTime);
    const guestReady = timestampMs(ev.vm.guestReadyTime);
    return {
      readyMs: ev.t - t0,
      rpcMs,
      launchMs: started - created, // agent clock: record made → VMM daemonized and QMP connected
      bootMs: guestReady - started, // agent clock: VMM started → ready line seen by the console tap
      deliverMs: ev.wall - guestReady, // ready recorded → event at this client
      deleteMs,
      cpuCreateMs: ticksToMs(c1.self - c0.self),
      cpuDeleteMs: ticksToMs(c2.self - c1.self),
      cpuChildrenMs: ticksToMs(c2.children - c0.children),
    };
  }

  /** N CreateVm at once: wall time from the first send to the last ready event; agent CPU per VM. */
  async function agentParallel(n) {
    const ids = Array.from({ length: n }, (_, i) => `agent-p${n}-${i}`);
    const c0 = cpuTicks(agentPid);
    const t0 = performance.now();
    const results = await Promise.allSettled(
      ids.map((id) => createToReady(id, parallelMemoryMib, parallelTimeoutMs(n))),
    );
    const c1 = cpuTicks(agentPid);
    const existing = new Set((await vms.listVms({})).vms.map((v) => v.name));
    const c2 = cpuTicks(agentPid);
    const tDel = performance.now();
    await remove(ids.filter((id) => existing.has(`vms/${id}`)));
    const deleteMs = performance.now() - tDel;
    const c3 = cpuTicks(agentPid);
    const failed = results.find((r) => r.status === "rejected");
    if (failed) throw failed.reason;
    return {
      wallMs: max(results.map((r) => r.value.ev.t)) - t0,
      cpuPerVmMs: ticksToMs(c1.self - c0.self) / n,
      deleteMs,
      cpuDeletePerVmMs: ticksToMs(c3.self - c2.self) / n,
    };
  }

  // The agent's CPU while idle (with this run's WatchVms stream open): what a boot's seconds cost anyway.
  const idleC0 = cpuTicks(agentPid);
  const idleT0 = performance.now();
  await sleep(5000);
  const idleMsPerS = ticksToMs(cpuTicks(agentPid).self - idleC0.self) / ((performance.now() - idleT0) / 1000);

  // Warm-up (page cache for the kernel and initrd, JIT, first-use paths in the agent): not counted.
  for (let i = 0; i < warmup; i++) {
    process.stderr.write(`warm-up ${i + 1}/${warmup}\n`);
    await handSample(`hand-warm-${i}`);
    await agentSample(`agent-warm-${i}`);
  }

  const hand = [];
  const agent = [];
  for (let i = 0; i < samples; i++) {
    // Alternate which goes first, so that neither always follows the other's teardown.
    const order = i % 2 === 0 ? ["hand", "agent"] : ["agent", "hand"];
    for (const which of order) {
      if (which === "hand") hand.push(await handSample(`hand-${i}`));
      else agent.push(await agentSample(`agent-${i}`));
      const last = which === "hand" ? hand.at(-1) : agent.at(-1);
      process.stderr.write(`sample ${i + 1}/${samples} ${which}: ${last.readyMs.toFixed(0)} ms\n`);
    }
  }

  const par = [];
  for (const [i, n] of parallel.entries()) {
    // Alternate which goes first here too.
    const r = { n };
    for (const which of i % 2 === 0 ? ["h", "a"] : ["a", "h"]) {
      r[which] = which === "h" ? await handParallel(n) : await agentParallel(n);
      const how = which === "h" ? "by hand" : "via agent";
      process.stderr.write(`parallel ${n} ${how}: ${(r[which].wallMs / 1000).toFixed(1)} s\n`);
    }
    par.push(r);
  }

  // ---- Report ----
  const col = (x, d = 0) => x.toFixed(d).padStart(8);
  const row = (label, xs, d = 0) =>
    `${label.padEnd(44)}${col(median(xs), d)}${col(min(xs), d)}${col(max(xs), d)}`;
  const pick = (xs, k) => xs.map((x) => x[k]);
  console.log(
    `\nVM create → guest ready: ${samples} samples each way (alternating, after ${warmup} warm-up), ` +
      `1 vCPU, ${memoryMib} MiB, TCG, ${qemu.path} ${qemu.version ?? ""}`,
  );
  console.log(
    `node ${process.version}, ${cpus().length} CPUs, ${(totalmem() / 2 ** 30).toFixed(0)} GiB, CLK_TCK ${clkTck}\n`,
  );
  console.log(`${"".padEnd(44)}  median     min     max`);
  console.log(row("by hand: spawn → ready line (ms)", pick(hand, "readyMs")));
  console.log(row("  of which spawn → daemonized", pick(hand, "launchMs")));
  console.log(row("via agent: CreateVm → ready event (ms)", pick(agent, "readyMs")));
  console.log(row("  CreateVm call returned", pick(agent, "rpcMs")));
  console.log(row("  record made → VMM started (agent clock)", pick(agent, "launchMs")));
  console.log(row("  VMM started → guest ready (agent clock)", pick(agent, "bootMs")));
  console.log(row("  guest ready recorded → event here", pick(agent, "deliverMs")));
  console.log(row("  DeleteVm(force) → operation done (ms)", pick(agent, "deleteMs")));
  const ratio = median(pick(agent, "readyMs")) / median(pick(hand, "readyMs"));
  const ratioMin = min(pick(agent, "readyMs")) / min(pick(hand, "readyMs"));
  console.log(
    `\nratio agent / by hand, create → ready: median ${ratio.toFixed(3)}×, min ${ratioMin.toFixed(3)}× ` +
      `(target ≤ 1.05)`,
  );
  console.log("\nagent CPU per VM (ms, the agent process's own utime+stime):");
  console.log(row("  create → ready", pick(agent, "cpuCreateMs")));
  console.log(row("  ready → deleted", pick(agent, "cpuDeleteMs")));
  console.log(
    row(
      "  whole cycle",
      agent.map((x) => x.cpuCreateMs + x.cpuDeleteMs),
    ),
  );
  console.log(row("  (reaped children: QEMU's launcher, etc.)", pick(agent, "cpuChildrenMs")));
  console.log(
    `  idle agent: ${idleMsPerS.toFixed(1)} ms/s, i.e. ≈ ${((idleMsPerS * median(pick(agent, "readyMs"))) / 1000).toFixed(0)} ms ` +
      `of the create → ready figure would be spent anyway`,
  );
  if (par.length) {
    console.log(
      `\nparallel creates (1 vCPU, ${parallelMemoryMib} MiB each; wall = first send → last ready):`,
    );
    console.log(
      "     N   by hand: wall s   VMs/s   agent: wall s   VMs/s   ratio agent/hand   agent CPU ms/VM: create→ready   delete   (delete all, s)",
    );
    for (const { n, h, a } of par) {
      console.log(
        `${String(n).padStart(6)} ${(h.wallMs / 1000).toFixed(1).padStart(17)} ${(n / (h.wallMs / 1000)).toFixed(3).padStart(7)}` +
          ` ${(a.wallMs / 1000).toFixed(1).padStart(15)} ${(n / (a.wallMs / 1000)).toFixed(3).padStart(7)}` +
          ` ${`${(a.wallMs / h.wallMs).toFixed(3)}×`.padStart(18)} ${a.cpuPerVmMs.toFixed(0).padStart(31)}` +
          ` ${a.cpuDeletePerVmMs.toFixed(0).padStart(8)} ${(a.deleteMs / 1000).toFixed(1).padStart(17)}`,
      );
    }
  }
  watchAbort.abort();
  await watching;
} finally {
  await cleanup();
  const left = await run("pgrep", ["-af", `qemu-system.*${escapeRe(dir)}`]);
  if (left.stdout.trim()) console.error(`QEMU processes left behind:\n${left.stdout}`);
}
