import { readFile } from "node:fs/promises";
import { create } from "@bufbuild/protobuf";
import { anyUnpack, durationFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  BlockService,
  type Operation,
  OperationState,
  VmMigrationPhase,
  VmMigrationProgressSchema,
  VmMigrationTargetSchema,
  VmNicSchema,
  VmState,
  VolumeFormat,
} from "@vmenv/api/agent/v1";
import { ErrorInfoSchema } from "@vmenv/api/google/rpc";
import { createDaemonClient } from "@vmenv/rpc";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { type RunningAgent, run, startAgent } from "./support/agent.js";
import { clients, consoleRun, done, guestVm, isReady, MIB, qemusUnder, until } from "./support/vm.js";

/**
 * Live migration between two real agents on this host (separate state directories, both on loopback),
 * real QEMU under TCG. The VMs have no NICs: two agents on one host derive the same bridge and tap
 * names for the same network and VM (network/names.ts), so a NIC could not exist on both at once here.
 */
type Clients = ReturnType<typeof clients> & {
  block: ReturnType<typeof createDaemonClient<typeof BlockService>>;
};
const allClients = (a: RunningAgent): Clients => ({
  ...clients(a.socket),
  block: createDaemonClient(BlockService, { socket: a.socket, timeoutMs: 120_000 }),
});

const fails = (p: Promise<unknown>) =>
  p.then(
    () => {
      throw new Error("expected the call to fail");
    },
    (e) => ConnectError.from(e),
  );
const reason = (e: ConnectError) => e.findDetails(ErrorInfoSchema)[0]?.reason;

/**
 * Why a guest that keeps writing cannot be migrated intact here, if it cannot: QEMU before 9.0 under TCG
 * loses the writes made after a dirty-bitmap sync when the RAM block is a whole number of 256 KiB (its
 * fast path clears the bits without re-arming the TCG TLB; fixed in 9.0 by "physmem: Fix migration dirty
 * bitmap coherency with TCG memory access"). The destination then runs on stale pages and its kernel
 * crashes (measured: every throttled migration of such a guest, pre-copy or post-copy).
 */
async function losesDirtyPages(pid: number): Promise<string | undefined> {
  const args = (await readFile(`/proc/${pid}/cmdline`, "utf8")).split("\0");
  const version = (await run(args[0] ?? "qemu-system-x86_64", ["--version"])).stdout;
  const major = Number(/version (\d+)\./.exec(version)?.[1] ?? 0);
  const size = /memory-backend-\w+,id=mem,size=(\d+)([KMG])/.exec(args.join(" "));
  const kib = size ? Number(size[1]) * { K: 1, M: 1024, G: 1024 * 1024 }[size[2] as "K" | "M" | "G"] : 0;
  if (major >= 9 || !args.some((a) => a.includes("accel=tcg")) || kib % 256 !== 0) return undefined;
  return `QEMU ${major} under TCG loses a writing guest's dirty pages in migration (fixed in QEMU 9.0; docs/adr/0015)`;
}

let marks = 0;
/** The guest's uptime in seconds, read on its console. */
async function uptime(c: Clients, name: string): Promise<number> {
  const n = 100 + ++marks;
  const m = await consoleRun(
    c,
    name,
    `echo U-$(cut -d' ' -f1 /proc/uptime)-$((${n}-1))`,
    new RegExp(`U-(\\d+\\.\\d+)-${n - 1}`),
  );
  return Number(m[1]);
}

async function wholeConsole(c: Clients, name: string): Promise<string> {
  let out = "";
  for await (const chunk of c.vms.streamConsole({ name }, { timeoutMs: 10_000 }))
    out += Buffer.from(chunk.data).toString("latin1");
  return out;
}

/** Waits for an operation to end (whatever its outcome). */
async function ended(c: Clients, op: Operation): Promise<Operation> {
  let cur = op;
  while (cur.state === OperationState.RUNNING || cur.state === OperationState.PENDING)
    cur = await c.diag.waitOperation({ name: op.name, timeout: durationFromMs(60_000) });
  return cur;
}

/**
 * Polls an operation until it ends, keeping every migration progress it reported on the way; `during`
 * sees the operation at each poll.
 */
async function watchProgress(c: Clients, op: Operation, during?: (op: Operation) => Promise<void>) {
  const seen: ReturnType<typeof progressOf>[] = [];
  let cur = op;
  while (cur.state === OperationState.RUNNING || cur.state === OperationState.PENDING) {
    await new Promise((r) => setTimeout(r, 40));
    cur = await c.diag.getOperation({ name: op.name });
    await during?.(cur);
    const p = progressOf(cur);
    if (p) seen.push(p);
  }
  return { op: cur, seen };
}
const progressOf = (op: Operation) =>
  op.metadata ? anyUnpack(op.metadata, VmMigrationProgressSchema) : undefined;

const targetOf = (op: Operation) => {
  const t = op.result && anyUnpack(op.result, VmMigrationTargetSchema);
  if (!t) throw new Error(`${op.kind} has no VmMigrationTarget result`);
  return t;
};

describe("live migration between two agents (real QEMU, TCG)", () => {
  let a: RunningAgent;
  let b: RunningAgent;
  /** A restarted A, on A's state. */
  let a2: RunningAgent | undefined;
  let ca: Clients;
  let cb: Clients;
  beforeEach(async () => {
    [a, b] = await Promise.all([
      startAgent(["--kvm-probe-timeout-ms", "200"]),
      startAgent(["--kvm-probe-timeout-ms", "200"]),
    ]);
    ca = allClients(a);
    cb = allClients(b);
  });
  afterEach(async () => {
    // Kills the QEMUs each agent left, even when the test failed.
    await a2?.stop();
    a2 = undefined;
    await Promise.all([a?.stop(), b?.stop()]);
  });

  it("moves a running guest to another agent: it keeps its uptime, progress is reported, the source is gone", async () => {
    await done(ca, await ca.vms.createVm(await guestVm("mover")));
    await until(() => ca.vms.getVm({ name: "vms/mover" }), isReady, 90_000, "guest ready");
    const before = await uptime(ca, "vms/mover");
    const source = await ca.vms.getVm({ name: "vms/mover" });

    const prepared = await done(cb, await cb.vms.prepareVmMigration({ vmId: "mover", vm: source }));
    const target = targetOf(prepared);
    expect(target.vm).toBe("vms/mover");
    expect(target.migrationUri).toMatch(/^tcp:127\.0\.0\.1:\d+$/);
    expect(target.storageUri).toBe("");
    expect((await cb.vms.getVm({ name: "vms/mover" })).state).toBe(VmState.MIGRATING);
    // Preparing again is a NOOP that answers the same target.
    const again = await done(cb, await cb.vms.prepareVmMigration({ vmId: "mover", vm: source }));
    expect(targetOf(again).migrationUri).toBe(target.migrationUri);

    const { op, seen } = await watchProgress(
      ca,
      await ca.vms.migrateVm({ name: "vms/mover", migrationUri: target.migrationUri }),
    );
    expect(op.state, op.error?.message).toBe(OperationState.SUCCEEDED);
    expect(op.kind).toBe("vm.migrate");
    const last = progressOf(op);
    expect(last?.phase).toBe(VmMigrationPhase.COMPLETED);
    expect(last?.memoryTransferredBytes).toBeGreaterThan(0n);
    expect(last?.memoryTotalBytes).toBeGreaterThanOrEqual(192n * MIB);
    expect(seen.length).toBeGreaterThan(0);
    // The source waits, paused, for the confirmation.
    const sent = await ca.vms.getVm({ name: "vms/mover" });
    expect(sent.state).toBe(VmState.MIGRATING);

    const finished = await done(cb, await cb.vms.finishVmMigration({ name: "vms/mover" }));
    expect(finished.kind).toBe("vm.finish_migration");
    const moved = await cb.vms.getVm({ name: "vms/mover" });
    expect(moved.state).toBe(VmState.RUNNING);
    expect(moved.pid).toBeGreaterThan(0);
    expect(moved.guestReadyTime).toBeDefined();
    expect(await qemusUnder(b.dir)).toEqual([moved.pid]);

    // Confirm: deleting the migrated source needs no force, and leaves no QEMU on A.
    await done(ca, await ca.vms.deleteVm({ name: "vms/mover" }));
    expect(await qemusUnder(a.dir)).toEqual([]);

    // The same guest goes on: its uptime kept growing, and it did not boot again on B.
    const after = await uptime(cb, "vms/mover");
    expect(after).toBeGreaterThan(before);
    const log = await wholeConsole(cb, "vms/mover");
    expect(log).not.toMatch(/VMENV-GUEST-READY|Linux version/);
    // It is a normal VM on B now: it pauses, resumes and stops.
    expect((await cb.vms.pauseVm({ name: "vms/mover" })).state).toBe(VmState.PAUSED);
    expect((await cb.vms.resumeVm({ name: "vms/mover" })).state).toBe(VmState.RUNNING);
    await done(cb, await cb.vms.stopVm({ name: "vms/mover", force: true }));
    expect(await qemusUnder(b.dir)).toEqual([]);
  }, 240_000);

  it("moves a VM with a local qcow2 volume together with its data", async () => {
    await done(
      ca,
      await ca.block.createVolume({
        volumeId: "data",
        volume: { store: "stores/default", format: VolumeFormat.QCOW2, sizeBytes: 64n * MIB },
      }),
    );
    const req = await guestVm("keeper");
    (req.vm.spec as { disks?: unknown[] }).disks = [
      { id: "data", volume: "volumes/data", serial: "sn-data" },
    ];
    await done(ca, await ca.vms.createVm(req));
    await until(() => ca.vms.getVm({ name: "vms/keeper" }), isReady, 90_000, "guest ready");
    await consoleRun(
      ca,
      "vms/keeper",
      "until [ -b /dev/vda ]; do sleep 0.2; done; echo moved-data-77 | dd of=/dev/vda bs=512 conv=sync 2>/dev/null; sync; echo wrote-$((5+4))",
      /wrote-9/,
      30_000,
    );
    const source = await ca.vms.getVm({ name: "vms/keeper" });
    const volume = await ca.block.getVolume({ name: "volumes/data" });

    // Without receive_storage, a volume B does not have is refused, and nothing is left on B.
    const missing = await fails(cb.vms.prepareVmMigration({ vmId: "keeper", vm: source }));
    expect(missing.code).toBe(Code.FailedPrecondition);
    expect(reason(missing)).toBe("VOLUME_NOT_FOUND");
    expect((await cb.vms.listVms({})).vms).toEqual([]);

    // A prepared destination that is deleted (the abort) takes the volume it created along.
    const aborted = { vmId: "keeper", vm: source, receiveStorage: true, volumes: [volume] };
    await done(cb, await cb.vms.prepareVmMigration(aborted));
    expect((await cb.block.getVolume({ name: "volumes/data" })).sizeBytes).toBe(64n * MIB);
    await done(cb, await cb.vms.deleteVm({ name: "vms/keeper" }));
    expect((await fails(cb.block.getVolume({ name: "volumes/data" }))).code).toBe(Code.NotFound);
    expect(await qemusUnder(b.dir)).toEqual([]);

    const prepared = await done(
      cb,
      await cb.vms.prepareVmMigration({
        vmId: "keeper",
        vm: source,
        receiveStorage: true,
        volumes: [volume],
      }),
    );
    const target = targetOf(prepared);
    expect(target.storageUri).toMatch(/^nbd:\/\/127\.0\.0\.1:\d+$/);
    const created = await cb.block.getVolume({ name: "volumes/data" });
    expect(created.sizeBytes).toBe(64n * MIB);
    expect(created.format).toBe(VolumeFormat.QCOW2);

    const { op, seen } = await watchProgress(
      ca,
      await ca.vms.migrateVm({
        name: "vms/keeper",
        migrationUri: target.migrationUri,
        storageUri: target.storageUri,
      }),
    );
    expect(op.state, op.error?.message).toBe(OperationState.SUCCEEDED);
    expect(progressOf(op)?.storageTotalBytes).toBe(64n * MIB);
    expect(progressOf(op)?.storageTransferredBytes).toBe(64n * MIB);
    expect(seen.some((p) => p.phase === VmMigrationPhase.STORAGE)).toBe(true);

    await done(cb, await cb.vms.finishVmMigration({ name: "vms/keeper" }));
    await done(ca, await ca.vms.deleteVm({ name: "vms/keeper" }));
    expect(await qemusUnder(a.dir)).toEqual([]);

    // The guest on B reads the marker from the disk itself (its page cache dropped first)...
    const read = await consoleRun(
      cb,
      "vms/keeper",
      "echo 3 > /proc/sys/vm/drop_caches; head -c 13 /dev/vda | tr a-z A-Z; echo",
      /MOVED-DATA-77/,
    );
    expect(read[0]).toBe("MOVED-DATA-77");
    // ...and B's volume file holds it, read on the host.
    const raw = `${b.dir}/data.raw`;
    const conv = await run("qemu-img", ["convert", "-U", "-f", "qcow2", "-O", "raw", created.path, raw]);
    expect(conv.code, conv.stderr).toBe(0);
    const head = await run("head", ["-c", "13", raw]);
    expect(head.stdout).toBe("moved-data-77");
  }, 240_000);

  it("keeps the source running when the migration fails or is cancelled, and the destination is cleaned", async () => {
    await done(ca, await ca.vms.createVm(await guestVm("stayer")));
    await until(() => ca.vms.getVm({ name: "vms/stayer" }), isReady, 90_000, "guest ready");
    const source = await ca.vms.getVm({ name: "vms/stayer" });

    // Bad input is refused before anything happens.
    const badUri = await fails(ca.vms.migrateVm({ name: "vms/stayer", migrationUri: "unix:/tmp/x" }));
    expect(badUri.code).toBe(Code.InvalidArgument);
    expect(reason(badUri)).toBe("INVALID_MIGRATION_URI");
    const withNic = structuredClone(source);
    withNic.spec?.nics.push(create(VmNicSchema, { id: "eth0", network: "networks/nowhere" }));
    const noNet = await fails(cb.vms.prepareVmMigration({ vmId: "stayer", vm: withNic }));
    expect(noNet.code).toBe(Code.FailedPrecondition);
    expect(reason(noNet)).toBe("NETWORK_NOT_FOUND");
    expect((await cb.vms.listVms({})).vms).toEqual([]);

    // 1. Nobody listens there: the migration fails, the source runs on.
    const wrong = await ended(
      ca,
      await ca.vms.migrateVm({ name: "vms/stayer", migrationUri: "tcp:127.0.0.1:1" }),
    );
    expect(wrong.state).toBe(OperationState.FAILED);
    expect((await ca.vms.getVm({ name: "vms/stayer" })).state).toBe(VmState.RUNNING);
    await uptime(ca, "vms/stayer");

    // 2. The destination's QEMU is killed mid-way (the stream throttled so that there is a mid-way).
    const slow = { maxBandwidthBytesPerSecond: 2n * MIB };
    let target = targetOf(await done(cb, await cb.vms.prepareVmMigration({ vmId: "stayer", vm: source })));
    const destPid = (await cb.vms.getVm({ name: "vms/stayer" })).pid;
    let op = await ca.vms.migrateVm({
      name: "vms/stayer",
      migrationUri: target.migrationUri,
      settings: slow,
    });
    await until(
      () => ca.diag.getOperation({ name: op.name }),
      (o) => (progressOf(o)?.memoryTransferredBytes ?? 0n) > 0n,
      30_000,
      "migration under way",
    );
    process.kill(destPid, "SIGKILL");
    op = await ended(ca, op);
    expect(op.state).toBe(OperationState.FAILED);
    expect(op.error?.message).toMatch(/migration/i);
    const kept = await ca.vms.getVm({ name: "vms/stayer" });
    expect(kept.state).toBe(VmState.RUNNING);
    const up1 = await uptime(ca, "vms/stayer");
    // The destination's VM is crashed (never restarted: it was migrating); DeleteVm cleans it.
    await until(
      () => cb.vms.getVm({ name: "vms/stayer" }),
      (v) => v.state === VmState.CRASHED,
      10_000,
      "destination crashed",
    );
    await done(cb, await cb.vms.deleteVm({ name: "vms/stayer" }));
    expect(await qemusUnder(b.dir)).toEqual([]);

    // 3. Cancelled by the caller: the source runs on, the prepared destination is deleted.
    target = targetOf(await done(cb, await cb.vms.prepareVmMigration({ vmId: "stayer", vm: source })));
    op = await ca.vms.migrateVm({ name: "vms/stayer", migrationUri: target.migrationUri, settings: slow });
    expect(op.mayCancel).toBe(true);
    await until(
      () => ca.diag.getOperation({ name: op.name }),
      (o) => (progressOf(o)?.memoryTransferredBytes ?? 0n) > 0n,
      30_000,
      "migration under way",
    );
    await ca.diag.cancelOperation({ name: op.name });
    op = await ended(ca, op);
    expect(op.state).toBe(OperationState.CANCELLED);
    expect((await ca.vms.getVm({ name: "vms/stayer" })).state).toBe(VmState.RUNNING);
    expect(await uptime(ca, "vms/stayer")).toBeGreaterThan(up1);
    await done(cb, await cb.vms.deleteVm({ name: "vms/stayer" }));
    expect(await qemusUnder(b.dir)).toEqual([]);
    expect((await cb.vms.listVms({})).vms).toEqual([]);

    // 4. Migrated, then rolled back (the destination never finished): ResumeVm runs the source again.
    target = targetOf(await done(cb, await cb.vms.prepareVmMigration({ vmId: "stayer", vm: source })));
    await done(ca, await ca.vms.migrateVm({ name: "vms/stayer", migrationUri: target.migrationUri }));
    expect((await ca.vms.getVm({ name: "vms/stayer" })).state).toBe(VmState.MIGRATING);
    await done(cb, await cb.vms.deleteVm({ name: "vms/stayer" }));
    expect((await ca.vms.resumeVm({ name: "vms/stayer" })).state).toBe(VmState.RUNNING);
    expect(await uptime(ca, "vms/stayer")).toBeGreaterThan(up1);
    expect(await qemusUnder(b.dir)).toEqual([]);

    // 5. The source agent is killed mid-way: the restarted agent cancels the migration it finds and
    // the guest runs on at the source.
    target = targetOf(await done(cb, await cb.vms.prepareVmMigration({ vmId: "stayer", vm: source })));
    op = await ca.vms.migrateVm({ name: "vms/stayer", migrationUri: target.migrationUri, settings: slow });
    await until(
      () => ca.diag.getOperation({ name: op.name }),
      (o) => (progressOf(o)?.memoryTransferredBytes ?? 0n) > 0n,
      30_000,
      "migration under way",
    );
    await a.kill();
    a2 = await startAgent(["--kvm-probe-timeout-ms", "200"], {}, { dir: a.dir });
    const ca2 = allClients(a2);
    const settled = await ca2.vms.getVm({ name: "vms/stayer" });
    expect(settled.state).toBe(VmState.RUNNING);
    expect(settled.stateMessage).toMatch(/agent restart/);
    await uptime(ca2, "vms/stayer");
    await done(cb, await cb.vms.deleteVm({ name: "vms/stayer", force: true }));
    expect(await qemusUnder(b.dir)).toEqual([]);
  }, 300_000);

  it("switches to post-copy when pre-copy cannot keep up: the guest runs on at the destination at once", async () => {
    await done(ca, await ca.vms.createVm(await guestVm("busy", { memoryMib: 128 })));
    // Post-copy with a storage copy is refused before anything starts.
    const withStorage = await fails(
      ca.vms.migrateVm({
        name: "vms/busy",
        migrationUri: "tcp:127.0.0.1:1",
        storageUri: "nbd://127.0.0.1:10809",
        settings: { postCopy: true },
      }),
    );
    expect(withStorage.code).toBe(Code.InvalidArgument);
    expect(withStorage.rawMessage).toMatch(/post-copy cannot be combined with copying storage/);
    expect((await ca.vms.getVm({ name: "vms/busy" })).state).toBe(VmState.RUNNING);
    expect((await ca.diag.listOperations({ kind: "vm.migrate" })).operations).toEqual([]);
    expect((await cb.vms.listVms({})).vms).toEqual([]);

    // The agent starts TCG guests with RAM that avoids QEMU's bug (ADR 0015): without that, this guest
    // would not arrive intact, pre-copy or post-copy.
    expect(await losesDirtyPages((await ca.vms.getVm({ name: "vms/busy" })).pid)).toBeUndefined();
    await until(() => ca.vms.getVm({ name: "vms/busy" }), isReady, 90_000, "guest ready");
    // The guest rewrites 16 MiB of random bytes in tmpfs over and over, printing each round's number.
    await consoleRun(
      ca,
      "vms/busy",
      "dd if=/dev/urandom of=/dev/shm/src bs=1M count=16 2>/dev/null; (n=0; while :; do cp /dev/shm/src /dev/shm/dst; n=$((n+1)); echo DIRTY-$n; done) &",
      /DIRTY-\d+/,
    );
    const before = await uptime(ca, "vms/busy");
    const source = await ca.vms.getVm({ name: "vms/busy" });
    const target = targetOf(await done(cb, await cb.vms.prepareVmMigration({ vmId: "busy", vm: source })));

    // 24 MiB/s and a 20 ms pause allowed (480 KiB) against ~20 MiB/s dirtied: pre-copy cannot converge.
    // From post-copy on the guest runs on B: the operation can no longer be cancelled.
    let cancel: ConnectError | Operation | undefined;
    const { op, seen } = await watchProgress(
      ca,
      await ca.vms.migrateVm({
        name: "vms/busy",
        migrationUri: target.migrationUri,
        settings: {
          postCopy: true,
          maxBandwidthBytesPerSecond: 24n * MIB,
          downtimeLimit: durationFromMs(20),
        },
      }),
      async (o) => {
        if (cancel || progressOf(o)?.phase !== VmMigrationPhase.POST_COPY) return;
        expect(o.mayCancel).toBe(false);
        cancel = await ca.diag.cancelOperation({ name: o.name }).catch((e) => ConnectError.from(e));
      },
    );
    expect(op.state, op.error?.message).toBe(OperationState.SUCCEEDED);
    expect(progressOf(op)?.phase).toBe(VmMigrationPhase.COMPLETED);
    expect(seen.some((p) => p?.phase === VmMigrationPhase.POST_COPY)).toBe(true);
    // Refused, unless the migration had just completed.
    if (cancel instanceof ConnectError) expect(reason(cancel)).toBe("OPERATION_NOT_CANCELLABLE");
    else expect(cancel?.state).toBe(OperationState.SUCCEEDED);
    // Post-copy handed the guest over at the switch: it runs on B before FinishVmMigration.
    await until(
      () => wholeConsole(cb, "vms/busy"),
      (log) => /DIRTY-\d+/.test(log),
      10_000,
      "the loop on B",
    );
    await done(cb, await cb.vms.finishVmMigration({ name: "vms/busy" }));
    expect((await cb.vms.getVm({ name: "vms/busy" })).state).toBe(VmState.RUNNING);
    // No rollback after post-copy: the source's copy is out of date. Deleting it confirms.
    const sent = await ca.vms.getVm({ name: "vms/busy" });
    expect(sent.state).toBe(VmState.MIGRATING);
    expect(sent.stateMessage).toMatch(/in post-copy/);
    const back = await fails(ca.vms.resumeVm({ name: "vms/busy" }));
    expect(back.code).toBe(Code.FailedPrecondition);
    expect(reason(back)).toBe("POSTCOPY_NO_ROLLBACK");
    await done(ca, await ca.vms.deleteVm({ name: "vms/busy" }));
    expect(await qemusUnder(a.dir)).toEqual([]);

    // The same guest goes on at B, intact: uptime kept, no second boot, the loop still counting, and
    // its kernel did not trip over a stale page.
    expect(await uptime(cb, "vms/busy")).toBeGreaterThan(before);
    const rounds = (log: string) => Math.max(...[...log.matchAll(/DIRTY-(\d+)/g)].map((m) => Number(m[1])));
    const log = await wholeConsole(cb, "vms/busy");
    expect(log).not.toMatch(/VMENV-GUEST-READY|Linux version/);
    const later = await until(
      () => wholeConsole(cb, "vms/busy"),
      (l) => rounds(l) > rounds(log) + 1,
      15_000,
      "more rounds on B",
    );
    expect(later).not.toMatch(/BUG|Oops|panic|corruption|segfault/);
  }, 120_000);
});
