#!/usr/bin/env node
// Block benchmark, through a real vmenv-agent and a TCG guest: sequential 4 KiB reads and writes with
// O_DIRECT inside the guest (busybox dd) on a plain-file disk (QEMU opens the file) and on a
// vhost-user-blk disk (a qemu-storage-daemon serves it), next to the floor: the same file read and
// written on the host with the same dd arguments. Then hot-add latency of a disk and of a NIC
// (CommitVmDeviceChanges until APPLIED, and until the guest sees the device). Prints ratios against the
// host figures measured in the same run. Never fails for being slow: a benchmark is not a test.
//
//   node scripts/bench/block.mjs [--mib 16] [--rounds 3]
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import {
  BlockService,
  DeviceChangeAction,
  DiagnosticsService,
  NetworkService,
  VmService,
  VolumeBackend,
  VolumeFormat,
} from "@vmenv/api/agent/v1";
import { createDaemonClient } from "@vmenv/rpc";
import {
  finished,
  guestImage,
  guestVm,
  MIB,
  median,
  run as runFor,
  sleep,
  startAgent,
  teardown,
} from "./lib.mjs";

const { values: opt } = parseArgs({
  options: { mib: { type: "string", default: "16" }, rounds: { type: "string", default: "3" } },
});
const mib = Number(opt.mib);
const rounds = Number(opt.rounds);
const count = (mib * 1024) / 4;

/** Runs a command with arguments (never through a shell). */
const run = (cmd, args, timeoutMs = 120_000) => runFor(cmd, args, timeoutMs);

const dir = await mkdtemp(join(tmpdir(), "vmenv-bench-block-"));
const agent = startAgent(dir);
const { socket } = agent;

let network;
let net;
const cleanup = teardown(dir, agent, async () => {
  // The agent's own cleanup first; whatever is left is removed by name.
  if (net && network) {
    const taps = (await net.listPorts({}).catch(() => ({ ports: [] }))).ports.map((p) => p.tapName);
    const vms = createDaemonClient(VmService, { socket, timeoutMs: 60_000 });
    await vms.deleteVm({ name: "vms/bench", force: true, allowMissing: true }).catch(() => undefined);
    for (let i = 0; i < 100; i++) {
      if ((await vms.listVms({}).catch(() => ({ vms: [] }))).vms.length === 0) break;
      await sleep(100);
    }
    await net.deleteNetwork({ name: network.name }).catch(() => undefined);
    for (const t of taps) await run("ip", ["link", "del", t]);
  }
  if (network) await run("ip", ["link", "del", network.bridgeName]);
});

try {
  await agent.ready;
  const vms = createDaemonClient(VmService, { socket, timeoutMs: 300_000 });
  const diag = createDaemonClient(DiagnosticsService, { socket, timeoutMs: 300_000 });
  const block = createDaemonClient(BlockService, { socket, timeoutMs: 300_000 });
  net = createDaemonClient(NetworkService, { socket, timeoutMs: 60_000 });
  const done = (op) => finished(diag, op, 120_000);
  /** Types a command on the guest's console; resolves with the output once `expect` matches. */
  const consoleRun = async (command, expect, timeoutMs = 300_000) => {
    const ac = new AbortController();
    const t = setTimeout(() => ac.abort(), timeoutMs);
    let seen = "";
    try {
      const stream = vms.streamConsole(
        { name: "vms/bench", lastLines: 1, follow: true },
        { signal: ac.signal, timeoutMs: 0 },
      );
      const reading = (async () => {
        for await (const chunk of stream) {
          seen += Buffer.from(chunk.data).toString("latin1");
          const m = expect.exec(seen);
          if (m) return m;
        }
      })();
      await sleep(200);
      await vms.sendConsoleInput({ name: "vms/bench", data: new TextEncoder().encode(`${command}\n`) });
      const m = await reading.catch(() => undefined);
      if (m) return m;
    } finally {
      clearTimeout(t);
      ac.abort();
    }
    throw new Error(`guest did not show ${expect} after ${command}: ${seen.slice(-300)}`);
  };

  // Two raw volumes of the same size, filled once (so reads read data, not holes).
  for (const [id, backend] of [
    ["plain", VolumeBackend.FILE],
    ["vu", VolumeBackend.VHOST_USER_BLK],
  ]) {
    await done(
      await block.createVolume({
        volumeId: id,
        volume: { store: "stores/default", format: VolumeFormat.RAW, sizeBytes: BigInt(mib) * MIB, backend },
      }),
    );
  }
  const plainPath = (await block.getVolume({ name: "volumes/plain" })).path;
  const { kernel, initrd } = await guestImage();
  await done(
    await vms.createVm(
      guestVm({
        id: "bench",
        kernel,
        initrd,
        memoryMib: 256,
        disks: [{ id: "plain", volume: "volumes/plain", readOnly: false }],
      }),
    ),
  );
  for (let i = 0; i < 900 && !(await vms.getVm({ name: "vms/bench" })).guestReadyTime; i++) await sleep(200);

  // Hot-add latency: a disk (vhost-user-blk, so a storage daemon starts too) and a NIC.
  const hot = async (device, guestCheck) => {
    const t0 = performance.now();
    const r = await vms.commitVmDeviceChanges({
      name: "vms/bench",
      changes: [{ action: DeviceChangeAction.BIND, device }],
    });
    const applied = performance.now() - t0;
    if (r.results[0]?.error) throw new Error(r.results[0].error.message);
    await consoleRun(`until ${guestCheck}; do sleep 0.05; done; echo HOT-$((40+2))`, /HOT-42/);
    return { applied, seen: performance.now() - t0 };
  };
  const disk = await hot({ case: "disk", value: { id: "vu", volume: "volumes/vu" } }, "[ -b /dev/vdb ]");
  network = await net.createNetwork({
    networkId: `bench-${Math.random().toString(36).slice(2, 7)}`,
    network: { cidr: `198.19.${Math.floor(Math.random() * 250) + 2}.0/24` },
  });
  const nic = await hot(
    { case: "nic", value: { id: "eth0", network: network.name } },
    "[ -e /sys/class/net/eth0 ]",
  );

  // Which guest disk is which: the plain one carries its serial; vhost-user-blk has none.
  const serial = await consoleRun("echo SER-$(cat /sys/block/vda/serial 2>/dev/null)-END", /SER-(\S*)-END/);
  const [plainDev, vuDev] = serial[1] === "plain" ? ["vda", "vdb"] : ["vdb", "vda"];
  const direct = await consoleRun(
    `dd if=/dev/${plainDev} of=/dev/null bs=4k count=1 iflag=direct >/dev/null 2>&1 && echo DIRECT-yes || echo DIRECT-no`,
    /DIRECT-(yes|no)/,
  );
  const hasDirect = direct[1] === "yes";
  const dropCaches = hasDirect ? "" : "sync; echo 3 > /proc/sys/vm/drop_caches; ";

  /** Seconds one guest dd took (from /proc/uptime around it: 10 ms resolution, runs last seconds). */
  const guestDd = async (args) => {
    const m = await consoleRun(
      `${dropCaches}a=$(cut -d' ' -f1 /proc/uptime); dd ${args} bs=4k count=${count} 2>/dev/null; b=$(cut -d' ' -f1 /proc/uptime); echo "DD-$a-$b-END"`,
      /DD-([\d.]+)-([\d.]+)-END/,
    );
    return Math.max(0.01, Number(m[2]) - Number(m[1]));
  };
  const hostDd = async (args) => {
    const t0 = performance.now();
    const r = await run("dd", [...args, "bs=4k", `count=${count}`]);
    if (r.code !== 0) throw new Error(`host dd: ${r.stderr}`);
    return (performance.now() - t0) / 1000;
  };
  const scratch = join(dir, "host-scratch.raw");
  const oflag = hasDirect ? ["oflag=direct"] : ["conv=fsync"];
  const iflag = hasDirect ? ["iflag=direct"] : [];
  const guestO = hasDirect ? "oflag=direct" : "conv=fsync";
  const guestI = hasDirect ? "iflag=direct" : "";
  const res = { write: { host: [], plain: [], vhost: [] }, read: { host: [], plain: [], vhost: [] } };
  for (let i = 0; i < rounds; i++) {
    res.write.host.push(await hostDd(["if=/dev/zero", `of=${scratch}`, ...oflag]));
    res.write.plain.push(await guestDd(`if=/dev/zero of=/dev/${plainDev} ${guestO}`));
    res.write.vhost.push(await guestDd(`if=/dev/zero of=/dev/${vuDev} ${guestO}`));
    if (!hasDirect) await run("sh", ["-c", "sync; echo 3 > /proc/sys/vm/drop_caches"]);
    res.read.host.push(await hostDd([`if=${plainPath}`, "of=/dev/null", ...iflag]));
    res.read.plain.push(await guestDd(`if=/dev/${plainDev} of=/dev/null ${guestI}`));
    res.read.vhost.push(await guestDd(`if=/dev/${vuDev} of=/dev/null ${guestI}`));
  }

  const mbps = (s) => (mib / s).toFixed(1);
  console.log(
    `block benchmark: ${mib} MiB sequential, 4 KiB blocks, ${hasDirect ? "O_DIRECT" : "caches dropped (busybox dd has no iflag=direct)"}, median of ${rounds}, TCG guest`,
  );
  console.log("op     where                 MiB/s   IOPS    vs host");
  for (const op of ["write", "read"]) {
    const host = median(res[op].host);
    for (const [k, label] of [
      ["host", "host (same file/dir)"],
      ["plain", "guest, plain file"],
      ["vhost", "guest, vhost-user-blk"],
    ]) {
      const s = median(res[op][k]);
      console.log(
        `${op.padEnd(6)} ${label.padEnd(21)} ${mbps(s).padStart(7)} ${String(Math.round(count / s)).padStart(6)}   ${(host / s).toFixed(3)}`,
      );
    }
  }
  console.log(
    `vhost-user-blk / plain file: write ${(median(res.write.plain) / median(res.write.vhost)).toFixed(2)}x, read ${(median(res.read.plain) / median(res.read.vhost)).toFixed(2)}x (throughput)`,
  );
  console.log(
    `hot-add disk (vhost-user-blk, daemon start included): APPLIED after ${disk.applied.toFixed(0)} ms, guest sees /dev/vdb after ${disk.seen.toFixed(0)} ms`,
  );
  console.log(
    `hot-add NIC (tap + virtio-net): APPLIED after ${nic.applied.toFixed(0)} ms, guest sees eth0 after ${nic.seen.toFixed(0)} ms`,
  );
  console.log("(guest-seen times include a console round trip of about 0.2-0.5 s)");
} finally {
  await cleanup();
}
